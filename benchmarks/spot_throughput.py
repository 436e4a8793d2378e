"""Images/s of `unparrot profile` (spot + parrot, local engine, 2 workers) against a plain loop calling
rapidocr with its defaults on each image, in the same run, on a LAION-like mix (half without text,
256-512 px). Target >= 3x on a 2-core machine, with the same has_text decision on >= 99% of images.

Run: .venv/bin/python benchmarks/spot_throughput.py [--n 400]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

import numpy as np

from _util import OUT, report, synthetic_pool


def build_mix(n: int):
    """Resize a laion-preset pool to random sides in [256, 512] (kept in new shards)."""
    from unparrot.imaging.decode import encode_image, open_image
    from unparrot.io.tar import ShardWriter
    from unparrot.pool import Pool

    root = OUT / f"spotmix-{n}"
    if (root / "shards").exists():
        return root
    src = synthetic_pool(f"spotmix-src-{n}", n, preset="laion", image_size=512, shard_size=n)
    rng = np.random.default_rng(0)
    with ShardWriter(str(root / "shards" / "{:05d}.tar"), max_count=(n + 1) // 2) as w:
        for row in Pool(src).samples():
            side = int(rng.integers(256, 513))
            im = open_image(row["image"]).resize((side, side))
            meta = dict(row["meta"])
            s = side / 512
            for t in meta["synth"]["texts"]:
                t["quad"] = [[x * s, y * s] for x, y in t["quad"]]
                t["height"] *= s
            import json

            w.write(row["key"], {"jpg": encode_image(im, "jpg", 90), "txt": row["caption"], "json": json.dumps(meta)})
    return root


def baseline(pool, min_score=0.5, min_chars=2) -> tuple[float, dict]:
    """The plain way: RapidOCR() with default settings, called on every image in one process."""
    import re

    from rapidocr import RapidOCR

    from unparrot.imaging.decode import decode_rgb
    from unparrot.pool import Pool

    eng = RapidOCR(params={"Global.log_level": "error"})
    has = {}
    t0 = time.perf_counter()
    for row in Pool(pool).samples():
        res = eng(decode_rgb(row["image"])[:, :, ::-1].copy())
        txts = list(res.txts or []) if getattr(res, "txts", None) is not None else []
        scores = list(res.scores or []) if txts else []
        has[row["uid"]] = any(
            s >= min_score and len(re.findall(r"[^\W_]", t)) >= min_chars for t, s in zip(txts, scores)
        )
    return time.perf_counter() - t0, has


def ours(pool, params: dict) -> tuple[float, dict, str]:
    from unparrot.pool import Pool
    from unparrot.profile import profile

    for d in ("columns", "errors", "embeddings"):
        shutil.rmtree(pool / d, ignore_errors=True)
    t0 = time.perf_counter()
    s = profile(pool, workers=2, spot_params=params, progress=False)
    dt = time.perf_counter() - t0
    df = Pool(pool).load("spot", columns=["has_text"])
    return dt, dict(zip(df["uid"], df["has_text"])), s.stage_lines[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--param", action="append", default=[], help="spot parameter key=value")
    a = ap.parse_args()
    import yaml

    pool = build_mix(a.n)
    t_ours, has_ours, line = ours(pool, {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in a.param)})
    t_base, has_base = baseline(pool)
    n = len(has_base)
    agree = np.mean([has_ours.get(u) == h for u, h in has_base.items()])
    from unparrot.pool import Pool

    truth = {r["uid"]: bool(r["meta"]["synth"]["texts"]) for r in Pool(pool).samples()}
    right_o = np.mean([has_ours.get(u) == t for u, t in truth.items()])
    right_b = np.mean([has_base.get(u) == t for u, t in truth.items()])
    print(line)
    ok = report("profile vs plain rapidocr loop", n / t_ours, n / t_base, "images/s", 3.0)
    print(
        f"same has_text decision: {100 * agree:.1f}% of {n} images (target >= 99%) "
        f"{'OK' if agree >= 0.99 else 'MISSED'}"
    )
    print(
        f"has_text right against the ground truth: ours {100 * right_o:.1f}%, plain loop {100 * right_b:.1f}% "
        f"(where the two disagree, this says which one was right)"
    )
    return 0 if ok and agree >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
