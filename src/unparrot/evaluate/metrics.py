"""Evaluation metrics as pure functions of arrays (CLIP_benchmark's definitions)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict:
    """Share of rows whose label is among the k highest logits (k capped at the number of classes)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    order = np.argsort(-logits, axis=1, kind="stable")
    out = {}
    for k in ks:
        kk = min(k, logits.shape[1])
        out[f"acc{k}"] = float((order[:, :kk] == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0
    return out


def mean_per_class_recall(preds: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """Mean over the classes present of the share of their samples predicted correctly."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    recalls = [float((preds[labels == c] == c).mean()) for c in range(n_classes) if (labels == c).any()]
    return float(np.mean(recalls)) if recalls else 0.0


def attack_success_rate(preds: np.ndarray, attack_labels: np.ndarray) -> float:
    """Share of attacked images classified as the class whose name is written on them."""
    preds, attack_labels = np.asarray(preds), np.asarray(attack_labels)
    valid = attack_labels >= 0
    return float((preds[valid] == attack_labels[valid]).mean()) if valid.any() else 0.0


def retrieval_recall(
    img_feats: np.ndarray, txt_feats: np.ndarray, txt_to_img: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict:
    """Recall@k both ways with several captions per image (CLIP_benchmark's naming):
    `image_retrieval_recall@k` = text -> image (the caption's image in the top k), and
    `text_retrieval_recall@k` = image -> text (any of the image's captions in the top k)."""
    sim = np.asarray(txt_feats) @ np.asarray(img_feats).T  # texts x images
    txt_to_img = np.asarray(txt_to_img)
    out = {}
    t2i_rank = np.argsort(-sim, axis=1, kind="stable")
    i2t_rank = np.argsort(-sim.T, axis=1, kind="stable")
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float((t2i_rank[:, :k] == txt_to_img[:, None]).any(axis=1).mean())
        hits = [np.isin(i2t_rank[i, :k], np.flatnonzero(txt_to_img == i)).any() for i in range(sim.shape[1])]
        out[f"text_retrieval_recall@{k}"] = float(np.mean(hits))
    return out


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (np.asarray(labels), np.asarray(preds)), 1)
    return cm


# ---- effective robustness (Fang et al.) -------------------------------------------------------------
def link_fn(p, link: str):
    p = np.clip(np.asarray(p, float), 1e-4, 1 - 1e-4)
    if link == "logit":
        return np.log(p / (1 - p))
    if link == "probit":
        from scipy.stats import norm

        return norm.ppf(p)
    if link == "linear":
        return p
    raise ValueError(f"link is logit, probit or linear, not {link!r}")


def _inverse(z, link: str):
    z = np.asarray(z, float)
    if link == "logit":
        return 1 / (1 + np.exp(-z))
    if link == "probit":
        from scipy.stats import norm

        return norm.cdf(z)
    return z


def fit_trend(acc_id: Sequence[float], acc_ood: Sequence[float], link: str = "logit") -> tuple[float, float]:
    """Least squares fit of link(acc_ood) = a * link(acc_id) + b over baseline models."""
    x, y = link_fn(acc_id, link), link_fn(acc_ood, link)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("fitting the robustness trend needs at least 2 baseline models with different accuracies")
    a, b = np.polyfit(x, y, 1)
    return float(a), float(b)


def effective_robustness(acc_id: float, acc_ood: float, a: float, b: float, link: str = "logit") -> float:
    """ER = acc_ood - inverse_link(a * link(acc_id) + b): accuracy above the baselines' trend line."""
    return float(acc_ood - _inverse(a * link_fn(acc_id, link) + b, link))


def mean_std(x, ddof: int = 0) -> tuple[float, float]:
    """Mean and standard deviation (`ddof=1`: the sample std, as over seeds); nan for no values."""
    x = np.asarray(x, float)
    return (float(x.mean()), float(x.std(ddof=ddof))) if len(x) else (math.nan, math.nan)
