"""Images/s of the whole `unparrot audit` (drawing the words and attacks, transform, image and text forward,
bootstrap intervals, card.json and card.html) against a bare open_clip image forward pass over the same
images (pre-drawn, pre-transformed tensors), in the same run. Target >= 0.85. Also prints the audit's total
time for ViT-B-32 with random weights (the compute of the real model; no download possible here): what a
user plans by.

The same images: a first audit runs with the model's image forward replaced by a recorder (it keeps every
image the audit would encode and returns random embeddings, costing only the drawing), so the baseline
forwards exactly the audit's images without knowing how the audit makes them.

Run: .venv/bin/python benchmarks/audit_throughput.py [--model ViT-B-32] [--words 200] [--per-class 20]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

from _util import OUT, report


def record_images(cfg):
    """Every image (PIL) the audit of `cfg` encodes, in order, without running the image tower."""
    import numpy as np

    from unparrot.evaluate import zeroshot
    from unparrot.evaluate.audit import audit
    from unparrot.imaging.decode import open_image

    seen, real = [], zeroshot.encode_images

    def recorder(clip, images, batch=64, workers=1):
        ims = [im() if callable(im) else im for im in images]
        seen.extend(open_image(im) if isinstance(im, (bytes, bytearray)) else im for im in ims)
        d = zeroshot.encode_texts(clip, ["a"]).shape[1]
        f = np.random.default_rng(len(seen)).standard_normal((len(ims), d)).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True), np.ones(len(ims), bool)

    zeroshot.encode_images = recorder
    try:
        audit(cfg)
    finally:
        zeroshot.encode_images = real
    return seen


def bare(clip, images, batch: int, device: str) -> float:
    import torch

    x = torch.stack([clip.preprocess(im) for im in images])
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            f = clip.model.encode_image(x[i : i + batch].to(device))
            torch.nn.functional.normalize(f.float(), dim=-1).cpu()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--words", type=int, default=200, help="vocab_top (the audit's default: all 137 built-in words)")
    ap.add_argument("--per-class", type=int, default=20, help="built-in set images per class (the default)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    import torch

    from unparrot.evaluate.audit import AuditConfig, audit
    from unparrot.models import load_clip

    ckpt = OUT / f"{a.model}-random.pt"
    if not ckpt.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save({"state_dict": load_clip(a.model).model.state_dict()}, ckpt)
    out = OUT / "audit-cards"
    shutil.rmtree(out, ignore_errors=True)
    cfg = dict(
        models=[str(ckpt)],
        model=a.model,
        out=str(out),
        vocab_top=a.words,
        builtin_per_class=a.per_class,
        batch_size=a.batch,
        device=a.device,
        workers=a.workers,
        progress=False,
    )
    images = record_images(AuditConfig(**cfg))
    clip = load_clip(a.model, str(ckpt), device=a.device)
    base = bare(clip, images, a.batch, a.device)
    del clip
    t0 = time.perf_counter()
    s = audit(AuditConfig(**cfg))[0]
    total = time.perf_counter() - t0
    t = s["timing"]
    ours = t["images"] / (total - t["load_s"])
    print(
        f"audit of {a.model} (random weights, {a.device}): {t['images']} images ({len(images)} recorded), "
        f"total {total:.1f} s including {t['load_s']:.1f} s model load -> {s['card']}"
    )
    ok = report(f"whole audit vs bare image forward ({a.model})", ours, base, "images/s", 0.85)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
