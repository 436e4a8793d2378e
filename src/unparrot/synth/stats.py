"""Ground-truth statistics of a synthetic pool (what a perfect text spotter would report)."""

from __future__ import annotations

import json
from collections import Counter

from ..pool import Pool
from ..cotr import co_embedded


def truth_stats(pool: Pool | str, top: int = 10) -> dict:
    """Share of images with text, CoTR statistics and top co-embedded words, from the recorded truth."""
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    n = n_text = n_parrot = n_full = 0
    cotr_sum = cotr_text_sum = 0.0
    words = co_words = 0
    co_counter: Counter = Counter()
    kinds: Counter = Counter()
    backgrounds: Counter = Counter()
    styles: Counter = Counter()
    for row in pool.samples():
        truth = (row["meta"] or {}).get("synth")
        if truth is None or row["caption"] is None:
            continue
        n += 1
        kinds[truth["kind"]] += 1
        if truth["kind"] != "parrot":
            backgrounds[truth.get("background")] += 1
            styles[truth.get("style", "filled")] += 1
        written = [t["text"] for t in truth["texts"]]
        m = co_embedded(row["caption"], written)
        words += len(m["caption_tokens"])
        co_words += len(m["co_emb"])
        co_counter.update(m["co_emb"])
        if written:
            n_text += 1
            cotr_text_sum += m["cotr"]
        cotr_sum += m["cotr"]
        n_parrot += m["is_parrot"]
        n_full += m["cotr"] == 1.0
    if n == 0:
        raise ValueError(f"{pool.root} has no synthetic ground truth (.json 'synth' records)")
    marker = pool.root / "synth.json"
    cfg = json.loads(marker.read_text()).get("config", {}) if marker.exists() else {}
    return {
        "world": {k: cfg.get(k) for k in ("backgrounds", "p_outline", "caption_mode", "plain_background") if k in cfg},
        "backgrounds": dict(backgrounds),
        "styles": dict(styles),
        "samples": n,
        "kinds": dict(kinds),
        "share_with_text": n_text / n,
        "mean_cotr": cotr_sum / n,
        "mean_cotr_text_images": cotr_text_sum / n_text if n_text else 0.0,
        "share_parrot_captions": n_parrot / n,
        "share_parrot_of_text_images": n_parrot / n_text if n_text else 0.0,
        "share_fully_parroted": n_full / n,
        "share_caption_words_in_image": co_words / words if words else 0.0,
        "top_co_emb_words": co_counter.most_common(top),
    }


def format_truth_stats(s: dict) -> str:
    top = ", ".join(f"{w} ({c})" for w, c in s["top_co_emb_words"])
    n_obj = max(1, sum(s.get("styles", {}).values()))
    world = ", ".join(f"{k}={v}" for k, v in s.get("world", {}).items())
    return "\n".join(
        [
            f"world parameters                     {world}",
            "backgrounds (object images)          "
            + ", ".join(f"{k} {100 * v / n_obj:.1f}%" for k, v in sorted(s.get("backgrounds", {}).items())),
            "styles (object images)               "
            + ", ".join(f"{k} {100 * v / n_obj:.1f}%" for k, v in sorted(s.get("styles", {}).items())),
            f"samples                              {s['samples']}  "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(s['kinds'].items()))})",
            f"images with text                     {100 * s['share_with_text']:.1f}%",
            f"mean CoTR (all / text images)        {s['mean_cotr']:.3f} / {s['mean_cotr_text_images']:.3f}",
            f"captions with CoTR > 0               {100 * s['share_parrot_captions']:.1f}% "
            f"({100 * s['share_parrot_of_text_images']:.1f}% of text images)",
            f"fully parroted captions (CoTR = 1)   {100 * s['share_fully_parroted']:.1f}%",
            f"caption words spelled in the image   {100 * s['share_caption_words_in_image']:.1f}%",
            f"top co-embedded words                {top}",
        ]
    )
