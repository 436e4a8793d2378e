"""Zero-shot classification and retrieval with any open_clip model (CLIP_benchmark's protocol)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..imaging.decode import DecodeError, open_image
from ..models import encode_text
from ..prefetch import prefetch
from .datasets import LabelledSet
from .metrics import attack_success_rate, mean_per_class_recall, retrieval_recall, topk_accuracy


def model_device(clip):
    """The device the model's weights are on (inputs go there; a model without parameters runs on the CPU)."""
    p = next(iter(clip.model.parameters()), None)
    return p.device if p is not None else "cpu"


def encode_texts(clip, texts: list[str], batch: int = 256) -> np.ndarray:
    import torch

    out, dev = [], model_device(clip)
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            f = encode_text(clip.model, clip.tokenizer(texts[i : i + batch]).to(dev))
            out.append(torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def class_embeddings(clip, classnames: list[str], templates: list[str]) -> np.ndarray:
    """Per class: the mean of its normalised template embeddings, re-normalised (CLIP's prompt ensemble)."""
    texts = [t.replace("{c}", c) for c in classnames for t in templates]
    e = encode_texts(clip, texts).reshape(len(classnames), len(templates), -1).mean(1)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def encode_images(clip, images: list, batch: int = 64, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image embeddings of encoded images (bytes), PIL images, or callables that return a PIL
    image (drawn lazily, e.g. a rendered word); returns (features, ok mask). Drawing, decoding and the
    transform run one batch ahead in a helper thread (`workers` > 1: that many threads per batch, for a
    GPU that outruns one thread), so the model never waits for the CPU side on CPU runs."""
    import torch

    def one(im):
        try:
            if callable(im):
                im = im()
            pil = open_image(im, draft=clip.image_size * 2) if isinstance(im, (bytes, bytearray)) else im
            return clip.preprocess(pil)
        except DecodeError:
            return None

    pool = ThreadPoolExecutor(workers, thread_name_prefix="unparrot-encode") if workers > 1 else None

    def prep(chunk):
        xs = list(pool.map(one, chunk)) if pool is not None else [one(im) for im in chunk]
        ok = [x is not None for x in xs]
        xs = [x for x in xs if x is not None]
        return (torch.stack(xs) if xs else None), ok

    feats, oks, dev = [], [], model_device(clip)
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]
    try:
        with torch.inference_mode():
            for x, ok in prefetch(prep, chunks):
                oks.extend(ok)
                if x is not None:
                    f = clip.model.encode_image(x.to(dev, non_blocking=True)).float()
                    feats.append(torch.nn.functional.normalize(f, dim=-1).cpu().numpy())
    finally:
        if pool is not None:
            pool.shutdown()
    return (np.concatenate(feats) if feats else np.zeros((0, 1), np.float32)), np.array(oks, bool)


def zeroshot(clip, ds: LabelledSet, batch: int = 64, outcomes: dict | None = None) -> dict:
    """acc1, acc5, mean per-class recall; on attacked sets also the attack success rate (prediction = the
    class written on the image). `outcomes`, a dict, receives the per-image record (key, label, pred,
    attack_label): verdicts need paired per-image results, not only the means."""
    if not ds.classnames:
        raise ValueError(f"{ds.name}: zero-shot needs class names (classnames.txt beside the shards)")
    rows = [r for r in ds.samples() if r["label"] is not None]
    feats, ok = encode_images(clip, [r["image"] for r in rows], batch)
    rows = [r for r, k in zip(rows, ok) if k]
    labels = np.array([r["label"] for r in rows])
    W = class_embeddings(clip, ds.classnames, ds.templates)
    logits = feats @ W.T
    preds = logits.argmax(1)
    m = topk_accuracy(logits, labels, (1, 5))
    m["mean_per_class_recall"] = mean_per_class_recall(preds, labels, len(ds.classnames))
    m["n"] = int(len(rows))
    m["undecodable"] = int((~ok).sum())
    attack = np.array([int((r["meta"] or {}).get("attack_label", -1)) for r in rows])
    if (attack >= 0).any():
        m["attack_success_rate"] = attack_success_rate(preds, attack)
    if outcomes is not None:
        outcomes.update(key=np.array([str(r["key"]) for r in rows]), label=labels, pred=preds, attack_label=attack)
    return m


def retrieval(clip, ds: LabelledSet, batch: int = 64) -> dict:
    """Recall@1/5/10 both ways on a set whose samples have captions (.txt lines or .json 'captions')."""
    rows = [r for r in ds.samples() if r["captions"]]
    if not rows:
        raise ValueError(f"{ds.name}: no captions for retrieval (.txt or .json 'captions')")
    feats, ok = encode_images(clip, [r["image"] for r in rows], batch)
    rows = [r for r, k in zip(rows, ok) if k]
    texts, owner = [], []
    for i, r in enumerate(rows):
        texts.extend(r["captions"])
        owner.extend([i] * len(r["captions"]))
    m = retrieval_recall(feats, encode_texts(clip, texts), np.array(owner))
    m["n_images"], m["n_texts"] = len(rows), len(texts)
    return m


def predictions(clip, ds: LabelledSet, batch: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, predictions, class embeddings) of a set: what `unparrot attack` needs from a reference model."""
    rows = [r for r in ds.samples() if r["label"] is not None]
    feats, ok = encode_images(clip, [r["image"] for r in rows], batch)
    labels = np.array([r["label"] for r, k in zip(rows, ok) if k])
    W = class_embeddings(clip, ds.classnames, ds.templates)
    return labels, (feats @ W.T).argmax(1), W
