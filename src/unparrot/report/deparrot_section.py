"""Report section of the deparrot stage: what was taken out of which captions, with the images beside them.

Shows the stage's funnel (samples, with spotted text, captions that spelled it, kept with a new caption,
left with nothing describable), the recipe's funnel when the `deparrot` subset exists, the most removed
words, and before/after captions next to their images with the OCR boxes drawn.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from .html import Section, draw_boxes, esc, grid, table
from .profile_section import fetch_samples


def deparrot_section(ctx) -> Section | None:
    pool = ctx.pool
    stage = ctx.options.get("deparrot_stage", "deparrot")
    spot = ctx.options.get("spot_stage", "spot")
    if not pool.done_shards(stage) or not pool.done_shards(spot):
        return None
    df = pool.load(
        [stage, spot],
        columns=["deparrot_caption", "deparrot_mode", "removed_words", "residual_cotr", "boxes", "texts", "has_text"],
        how="inner",
    )
    n = len(df)
    modes = df["deparrot_mode"].to_numpy()
    null = df["deparrot_caption"].isna().to_numpy()
    changed = modes != "none"
    has_text = df["has_text"].astype(bool).to_numpy()
    removed = Counter(w for ws in df["removed_words"] for w in (list(ws) if ws is not None else []))

    def pct(k):
        return f"{100 * k / max(1, n):.1f}%"

    funnel = [
        ["samples", n, pct(n)],
        ["with spotted text", int(has_text.sum()), pct(has_text.sum())],
        ["caption spells it (de-parroted)", int(changed.sum()), pct(changed.sum())],
        ["  kept with a new caption", int((changed & ~null).sum()), pct((changed & ~null).sum())],
        ["  nothing describable left (null)", int(null.sum()), pct(null.sum())],
        ["kept in all (caption unchanged or de-parroted)", int((~null).sum()), pct((~null).sum())],
    ]
    body = [
        "<p class='note'>The deparrot stage keeps the images with text and takes the words they spell out of "
        "their captions (strip) or has an LLM rewrite the caption without them (rewrite). Residual CoTR is the "
        "new caption's CoTR against the same spotted text.</p>",
        table(["step", "samples", "of pool"], funnel),
        table(["mode", "samples"], [[m, int(c)] for m, c in sorted(Counter(modes.tolist()).items())]),
        table(
            ["measure", "value"],
            [
                ["spelled words removed", sum(removed.values())],
                ["per de-parroted caption", f"{sum(removed.values()) / max(1, changed.sum()):.2f}"],
                ["max residual CoTR", f"{float(df['residual_cotr'].max()) if n else 0.0:.3f}"],
            ],
        ),
    ]
    if removed:
        body.append("<h3>Most removed words</h3>" + table(["word", "removed"], removed.most_common(15)))
    sub = pool.root / "subsets" / "deparrot.json"
    if sub.exists():
        s = json.loads(sub.read_text())
        rows = [[f["step"], f["before"], f["removed"], f["after"], f.get("skipped", "")] for f in s.get("funnel", [])]
        body.append("<h3>deparrot recipe funnel</h3>" + table(["step", "before", "removed", "after", "note"], rows))
    body.append(_examples(pool, df, changed, null))
    return Section("deparrot", "De-parroted captions", "".join(body))


def _examples(pool, df, changed, null) -> str:
    rng = np.random.default_rng(0)
    picks = []
    for mask, k in ((changed & ~null, 12), (null, 4)):
        idx = np.flatnonzero(mask)
        picks += [int(i) for i in idx[rng.permutation(len(idx))[:k]]]
    if not picks:
        return ""
    rows = df.iloc[picks]
    samples = fetch_samples(pool, rows[["uid", "shard"]].to_dict("records"))
    cells = []
    for r in rows.to_dict("records"):
        im, before = samples.get(r["uid"], (None, ""))
        if im is None:
            continue
        after = r["deparrot_caption"]
        words = list(r["removed_words"]) if r["removed_words"] is not None else []
        cap = (
            f"<b>before</b> {esc(before[:120])}<br><b>after</b> "
            f"{esc(after[:120]) if isinstance(after, str) else '<i>null</i>'}"
            f"<br><span class='note'>{esc(r['deparrot_mode'])}; removed: {esc(' '.join(words)[:60])}</span>"
        )
        cells.append((draw_boxes(im, r["boxes"], r["texts"]), cap))
    return "<h3>Before and after (random examples; green: OCR boxes)</h3>" + grid(cells)
