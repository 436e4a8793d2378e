"""Images/s of zero-shot evaluation (reading the set, decoding, transform, image forward, class
embeddings, metrics) against the bare image forward pass on pre-decoded tensors, in the same run.
Target >= 0.85. ViT-B-32 with random weights (the compute of the real model; no download possible here).

Run: .venv/bin/python benchmarks/eval_throughput.py [--per-class 30]
"""

from __future__ import annotations

import argparse
import sys
import time

from _util import OUT, report, synthetic_pool


def bare(clip, ds, batch) -> float:
    import torch

    from unparrot.imaging.decode import open_image

    x = torch.stack([clip.preprocess(open_image(r["image"])) for r in ds.samples()])
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            torch.nn.functional.normalize(clip.model.encode_image(x[i : i + batch]), dim=-1)
    return len(x) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    import torch

    from unparrot.evaluate.datasets import load_set
    from unparrot.evaluate.zeroshot import zeroshot
    from unparrot.models import load_clip

    pool = synthetic_pool(f"eval-{a.per_class}", 10, preset="laion", eval_sets=("clean",), eval_per_class=a.per_class)
    ds = load_set(pool / "eval" / "clean")
    n = sum(1 for _ in ds.samples())
    ckpt = OUT / f"{a.model}-random.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        torch.save({"state_dict": load_clip(a.model).model.state_dict()}, ckpt)
    best_o = best_b = 0.0
    for _ in range(3):  # fresh model each side, interleaved, best of each
        clip = load_clip(a.model, str(ckpt))
        best_b = max(best_b, bare(clip, ds, a.batch))
        clip = load_clip(a.model, str(ckpt))
        t0 = time.perf_counter()
        m = zeroshot(clip, ds, a.batch)
        best_o = max(best_o, n / (time.perf_counter() - t0))
    print(f"zero-shot on {n} images: acc1 {m['acc1']:.3f} (random weights: chance level expected)")
    ok = report(f"zero-shot evaluation vs bare image forward ({a.model})", best_o, best_b, "images/s", 0.85)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
