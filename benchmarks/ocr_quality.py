"""Accuracy of the default text spotter (rapidocr) against the synthetic world's ground truth (oracle).

On a `laion`-preset pool (256 px, 1-3 words of 6-77 px height, rotated up to 15 degrees): has_text
precision/recall/F1, word recall of the rendered strings and CoTR mean absolute error, broken down by
text height and rotation. Targets: has_text F1 >= 0.95 for text >= 12 px high; CoTR MAE <= 0.05.

Run: .venv/bin/python benchmarks/ocr_quality.py [--n 1000] [--param det_max_side=960 ...]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import yaml

from _util import synthetic_pool


def _bin_line(label, words, rows, wi, key, lo, hi):
    """Word recall, has_text recall and CoTR error of the text-bearing images in one bin."""
    ws = [w[3] for w in words if lo <= w[wi] < hi]
    imgs = [r for r in rows if r["truth"] and lo <= r[key] < hi]
    if not ws:
        return
    rec = np.mean([r["pred"] for r in imgs]) if imgs else float("nan")
    mae = np.mean([abs(r["cotr_true"] - r["cotr_pred"]) for r in imgs]) if imgs else float("nan")
    print(
        f"  {label} word recall {np.mean(ws):.3f} (n={len(ws)}); has_text recall {rec:.3f}, "
        f"CoTR MAE {mae:.4f} (n={len(imgs)} images)"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--param", action="append", default=[], help="spot parameter key=value")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=256, help="side of the synthetic images")
    a = ap.parse_args()
    from unparrot.engine import StageConflict, run
    from unparrot.pool import Pool
    from unparrot.cotr import co_embedded, tokens

    src = synthetic_pool(
        f"ocr-laion{a.image_size}-{a.n}", a.n, preset="laion", shard_size=max(1, a.n // 4), image_size=a.image_size
    )
    params = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in a.param)}
    stage = "spot_" + "_".join(f"{k}{v}" for k, v in sorted(params.items())) if params else "spot"
    pool = Pool(src)
    try:
        s = run(pool, "spot", params, stage=stage, workers=a.workers, progress=False)
    except StageConflict:
        s = run(pool, "spot", params, stage=stage, workers=a.workers, progress=False, overwrite=True)
    print(s.line())
    got = pool.load(stage).set_index("uid")
    rows = []
    for r in pool.samples():
        if r["uid"] not in got.index:
            continue
        truth = r["meta"]["synth"]["texts"]
        g = got.loc[r["uid"]]
        read = set(t for x in g["texts"] for t in tokens(x))
        heights = [t["height"] for t in truth]
        rows.append(
            {
                "truth": bool(truth),
                "pred": bool(g["has_text"]),
                "max_h": max(heights) if heights else 0.0,
                "max_angle": max((abs(t["angle"]) for t in truth), default=0.0),
                "words": [(t["text"], t["height"], abs(t["angle"]), t["text"] in read) for t in truth],
                "cotr_true": co_embedded(r["caption"], [t["text"] for t in truth])["cotr"],
                "cotr_pred": co_embedded(r["caption"], list(g["texts"]))["cotr"],
            }
        )
    print(f"{len(rows)} images, {sum(r['truth'] for r in rows)} with text")

    def prf(sub):
        tp = sum(r["truth"] and r["pred"] for r in sub)
        fp = sum(r["pred"] and not r["truth"] for r in sub)
        fn = sum(r["truth"] and not r["pred"] for r in sub)
        p = tp / (tp + fp) if tp + fp else 1.0
        rc = tp / (tp + fn) if tp + fn else 1.0
        return p, rc, 2 * p * rc / (p + rc) if p + rc else 0.0

    p, rc, f1 = prf(rows)
    big = [r for r in rows if not r["truth"] or r["max_h"] >= 12]
    bp, br, bf1 = prf(big)
    mae = float(np.mean([abs(r["cotr_true"] - r["cotr_pred"]) for r in rows]))
    print(f"has_text all images:        precision {p:.3f} recall {rc:.3f} F1 {f1:.3f}")
    print(
        f"has_text text >= 12 px:     precision {bp:.3f} recall {br:.3f} F1 {bf1:.3f} (target F1 >= 0.95) "
        f"{'OK' if bf1 >= 0.95 else 'MISSED'}"
    )
    print(f"CoTR mean absolute error:   {mae:.4f} (target <= 0.05) {'OK' if mae <= 0.05 else 'MISSED'}")
    words = [w for r in rows for w in r["words"]]
    print(f"word recall (rendered strings read exactly): {np.mean([w[3] for w in words]):.3f} of {len(words)}")
    print("by text height (px; images binned by their largest word; precision is over the text-free images above):")
    for lo, hi in ((0, 12), (12, 20), (20, 32), (32, 64), (64, 1e9)):
        _bin_line(f"{lo:>3}-{hi if hi < 1e9 else '':<4}", words, rows, 1, "max_h", lo, hi)
    print("by rotation (degrees; images binned by their most rotated word):")
    for lo, hi in ((0, 5), (5, 10), (10, 90)):
        _bin_line(f"{lo:>3}-{hi:<4}", words, rows, 2, "max_angle", lo, hi)
    return 0 if bf1 >= 0.95 and mae <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
