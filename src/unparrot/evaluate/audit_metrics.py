"""The audit's measurements as pure functions of embeddings and predictions, each with a 95% interval.

Intervals are percentile bootstrap intervals over the independent units of each measurement: the words
of the vocabulary (a word's renderings move together: they share its text embedding), the images of the
labelled set, the pairs of the pool. The resampling is seeded, so a card is reproducible bit for bit.

The bootstrap helper lives here on purpose, small and vectorised; the demo's paired-bootstrap verdicts
(another module) answer a different question (is model A better than model B) and may absorb it later.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

LEVEL = 0.95


def bootstrap(
    n_units: int,
    statistic: Callable[[np.ndarray], np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile interval of `statistic` over `n_boot` resamples of `n_units` units with replacement.

    `statistic(idx)` gets an (n_boot, n_units) matrix of resampled unit indices and returns one value per
    row: vectorised, so 1000 resamples of a few thousand units take milliseconds. NaN rows (a resample
    where the statistic is undefined) are ignored; no units gives (nan, nan)."""
    if n_units == 0 or n_boot < 1:
        return (math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, n_units, size=(int(n_boot), int(n_units)))
    vals = np.asarray(statistic(idx), float)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return (math.nan, math.nan)
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (float(lo), float(hi))


def mean_interval(values, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the mean of per-unit values."""
    v = np.asarray(values, float)
    return bootstrap(len(v), lambda idx: v[idx].mean(1), n_boot, seed)


def _by_group(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group: the sum of `values` (1-D: one value per row)."""
    return np.bincount(groups, weights=values, minlength=n_groups)


def derangements(n: int, k: int, seed: int = 0) -> np.ndarray:
    """`k` seeded permutations of range(n) without fixed points, shape (k, n): several, so the mismatched
    baseline does not hang on one random pairing of words."""
    from .sync import derangement

    return np.stack([derangement(n, seed + i) for i in range(k)])


def sync_measures(
    I: np.ndarray, T: np.ndarray, word_of: np.ndarray, perms: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Sync score (Parrot captions) of renderings `I` (R x d, L2-normalised) of words `word_of` (R,) against
    the vocabulary's text embeddings `T` (V x d): the cosine of a rendering with its own word, mean and std
    over all renderings as the paper reports them; the mismatched mean (the same rendering against the word
    each derangement in `perms` (K x V) assigns); and the gap matched - mismatched. Intervals resample words."""
    I, T, word_of = np.asarray(I, float), np.asarray(T, float), np.asarray(word_of)
    V = len(T)
    matched = (I * T[word_of]).sum(1)
    mism = np.stack([(I * T[p[word_of]]).sum(1) for p in np.asarray(perms)], 1)  # R x K
    cnt = np.bincount(word_of, minlength=V).astype(float)
    s1, s2 = _by_group(matched, word_of, V), _by_group(matched**2, word_of, V)
    sx = _by_group(mism.mean(1), word_of, V)
    mean = float(matched.mean())
    std = float(matched.std())
    xmean = float(mism.mean())

    def stats(idx):
        c = cnt[idx].sum(1)
        m = s1[idx].sum(1) / c
        return m, np.sqrt(np.maximum(s2[idx].sum(1) / c - m**2, 0)), sx[idx].sum(1) / c

    out = {"sync_mean": mean, "sync_std": std, "mismatched_mean": xmean, "sync_gap": mean - xmean}
    out["sync_mean_ci95"] = list(bootstrap(V, lambda idx: stats(idx)[0], n_boot, seed))
    out["sync_std_ci95"] = list(bootstrap(V, lambda idx: stats(idx)[1], n_boot, seed))
    out["mismatched_mean_ci95"] = list(bootstrap(V, lambda idx: stats(idx)[2], n_boot, seed))
    out["sync_gap_ci95"] = list(bootstrap(V, lambda idx: stats(idx)[0] - stats(idx)[2], n_boot, seed))
    out["n_words"], out["n_renders"], out["n_derangements"] = int(V), int(len(I)), int(len(perms))
    return out


def word_reading(
    I: np.ndarray, T: np.ndarray, word_of: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[dict, np.ndarray]:
    """Zero-shot top-1 reading among the vocabulary: a rendering is read when its nearest word embedding is
    its own word. Returns the measures (read_top1 with its interval over words, the chance floor 1/V) and
    the per-rendering margin (own cosine minus the best other word's) that ranks the words best read."""
    I, T, word_of = np.asarray(I, float), np.asarray(T, float), np.asarray(word_of)
    V = len(T)
    sim = I @ T.T
    hit = (sim.argmax(1) == word_of).astype(float)
    own = sim[np.arange(len(I)), word_of]
    other = sim.copy()
    other[np.arange(len(I)), word_of] = -np.inf
    margin = own - other.max(1)
    cnt = np.bincount(word_of, minlength=V).astype(float)
    h = _by_group(hit, word_of, V)
    out = {
        "read_top1": float(hit.mean()),
        "read_top1_ci95": list(bootstrap(V, lambda idx: h[idx].sum(1) / cnt[idx].sum(1), n_boot, seed)),
        "chance": 1.0 / V,
        "n_words": int(V),
        "n_renders": int(len(I)),
    }
    return out, margin


def attack_measures(
    labels,
    clean_pred,
    attacked_pred,
    control_pred,
    attack_label,
    n_classes: int,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Typographic attack (ImageNet-Attr style) on images with true `labels`: accuracy clean, with a wrong
    class name written on (attacked), and with a non-class control word at the same place (control); the
    attack success rate (prediction = the written class); the chance floor 1/n_classes. The control
    separates "any text distracts" (control accuracy drops too) from "the model reads the class name"
    (only the attacked accuracy drops). Intervals resample images."""
    y = np.asarray(labels)
    cols = {
        "clean_acc1": np.asarray(clean_pred) == y,
        "attacked_acc1": np.asarray(attacked_pred) == y,
        "control_acc1": np.asarray(control_pred) == y,
        "attack_success_rate": np.asarray(attacked_pred) == np.asarray(attack_label),
    }
    out = {}
    for k, v in cols.items():
        v = v.astype(float)
        out[k] = float(v.mean()) if len(v) else math.nan
        out[f"{k}_ci95"] = list(mean_interval(v, n_boot, seed))
    out["chance"] = 1.0 / n_classes
    out["n_images"], out["n_classes"] = int(len(y)), int(n_classes)
    return out


def flipped(labels, clean_pred, attacked_pred, attack_label) -> np.ndarray:
    """Indices of the images the attack flipped: right when clean, read as the written class when attacked."""
    y = np.asarray(labels)
    return np.flatnonzero((np.asarray(clean_pred) == y) & (np.asarray(attacked_pred) == np.asarray(attack_label)))


def text_reliance(
    score, masked_score, mismatched_score, carried_fraction: float = 0.5, n_boot: int = 1000, seed: int = 0
) -> dict:
    """How much of the CLIP score of text-bearing pairs their text carries (T-MARS's view): the score of
    (image, caption), of (text-masked image, caption), and of (image, another pair's caption) as the
    baseline b of an unrelated caption. A pair is carried by its text when its score is above b and masking
    the text takes away more than `carried_fraction` of its margin over b: s_masked - b < f (s - b). The
    baseline makes the rule independent of a model's cosine offset (small models' raw cosines are not
    comparable). Intervals resample pairs, with the baseline fixed at its value over all pairs (recomputing
    it per resample flips pairs that sit at the baseline, as every pair of an untrained model does, and gives
    intervals that miss the estimate)."""
    s, sm, sx = (np.asarray(a, float) for a in (score, masked_score, mismatched_score))
    f = float(carried_fraction)
    b = float(sx.mean()) if len(sx) else math.nan
    carried = ((s > b) & (sm - b < f * (s - b))).astype(float)
    out = {
        "clip_score": float(s.mean()) if len(s) else math.nan,
        "masked_clip_score": float(sm.mean()) if len(sm) else math.nan,
        "mismatched_clip_score": b,
        "score_drop": float((s - sm).mean()) if len(s) else math.nan,
        "carried_share": float(carried.mean()) if len(s) else math.nan,
        "carried_fraction": f,
        "n_pairs": int(len(s)),
    }
    out["clip_score_ci95"] = list(mean_interval(s, n_boot, seed))
    out["masked_clip_score_ci95"] = list(mean_interval(sm, n_boot, seed))
    out["score_drop_ci95"] = list(mean_interval(s - sm, n_boot, seed))
    out["carried_share_ci95"] = list(mean_interval(carried, n_boot, seed))
    return out


def intervals_overlap(a, b) -> bool:
    """Whether two [lo, hi] intervals share a point."""
    return not (a[1] < b[0] or b[1] < a[0])
