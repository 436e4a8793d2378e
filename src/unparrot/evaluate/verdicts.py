"""Verdicts from confidence intervals: holds / fails / inconclusive (docs/protocol.md).

A finding compares a treatment with a control on the same evaluation items (images, rendered words, pool
samples) of each seed. Point estimates are not evidence here: the all-data model's clean accuracy alone
varies by ~8 points between seeds, so a verdict is read from a 95% hierarchical bootstrap interval
(resample the seeds, then the items within each drawn seed), which carries both the seed-to-seed and the
finite-evaluation-set noise. Everything is a pure function of arrays and a seed, so a verdict is
reproducible from the saved per-item outcomes.

Claims (`Claim`): direction "+" (treatment − control > −margin), "-" (< margin) or "0" (|difference| <
margin: an equivalence claim such as "no ER difference"). The rule, fixed in the protocol:
- holds: the interval lies on the claimed side of the boundary, and (directional claims) so does every
  seed's own estimate;
- fails: the interval lies entirely on the other side;
- inconclusive: otherwise, reported with the effect size and roughly how many seeds or items per seed a
  difference of that size would need for the interval to clear the boundary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

Group = Mapping[str, np.ndarray]  # one seed's arrays, all indexed by the same items along axis 0


@dataclass(frozen=True)
class Claim:
    """What a finding claims about treatment − control (see the module docstring)."""

    direction: str  # "+", "-" or "0"
    margin: float = 0.0

    def __post_init__(self):
        if self.direction not in ("+", "-", "0"):
            raise ValueError(f"a claim's direction is '+', '-' or '0', not {self.direction!r}")
        if self.margin < 0 or (self.direction == "0" and self.margin == 0):
            raise ValueError("a claim's margin is >= 0, and > 0 for an equivalence ('0') claim")

    def text(self) -> str:
        m = self.margin
        if self.direction == "0":
            return f"|difference| < {m:g}"
        bound = f"{-m if self.direction == '+' else m:+g}" if m else "0"
        return f"difference {'>' if self.direction == '+' else '<'} {bound}"


@dataclass
class Interval:
    """A bootstrap interval of a pooled statistic (the mean over seeds of a per-seed statistic)."""

    estimate: float
    low: float
    high: float
    per_seed: list[float]
    n_items: list[int]
    confidence: float
    item_halfwidth: float  # half-width with the seeds held fixed (item resampling only)
    n_boot: int = 0

    @property
    def halfwidth(self) -> float:
        return (self.high - self.low) / 2


def _quantiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    a = (1 - confidence) / 2
    lo, hi = np.quantile(samples, [a, 1 - a])
    return float(lo), float(hi)


def _take(group: Group, idx: np.ndarray) -> dict:
    return {k: np.asarray(v)[idx] for k, v in group.items()}


def _n_items(group: Group) -> int:
    lens = {len(np.asarray(v)) for v in group.values()}
    if len(lens) != 1:
        raise ValueError(f"a seed's arrays must share their item axis; lengths {sorted(lens)}")
    (n,) = lens
    if n == 0:
        raise ValueError("a seed with no evaluation items")
    return n


def bootstrap(
    groups: Sequence[Group],
    stat: Callable[[dict], float],
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Hierarchical percentile bootstrap of mean_s stat(groups[s]): each replicate draws the seeds with
    replacement, then the items of each drawn seed with replacement (the same item indices for every
    array of that seed, so paired comparisons stay paired). With one seed only the items are resampled.
    Also returns the half-width with the seeds held fixed, used to say whether more items alone would do."""
    if not groups:
        raise ValueError("bootstrap needs at least one seed")
    if not 0 < confidence < 1 or n_boot < 10:
        raise ValueError("confidence in (0, 1) and n_boot >= 10")
    sizes = [_n_items(g) for g in groups]
    per_seed = [float(stat({k: np.asarray(v) for k, v in g.items()})) for g in groups]
    rng = np.random.default_rng(seed)
    S = len(groups)
    pooled = np.empty(n_boot)
    fixed = np.empty(n_boot)
    for b in range(n_boot):
        draws = rng.integers(S, size=S) if S > 1 else np.zeros(1, int)
        pooled[b] = np.mean([stat(_take(groups[s], rng.integers(sizes[s], size=sizes[s]))) for s in draws])
        fixed[b] = np.mean([stat(_take(groups[s], rng.integers(sizes[s], size=sizes[s]))) for s in range(S)])
    lo, hi = _quantiles(pooled, confidence)
    flo, fhi = _quantiles(fixed, confidence)
    return Interval(float(np.mean(per_seed)), lo, hi, per_seed, sizes, confidence, (fhi - flo) / 2, n_boot)


def mean_difference(g: dict) -> float:
    """The paired statistic: mean over items of treatment − control."""
    return float(np.mean(g["treatment"]) - np.mean(g["control"]))


def paired_difference(
    treatment: Sequence[np.ndarray],
    control: Sequence[np.ndarray],
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Treatment − control per seed (per-item outcomes on the same items, e.g. 1.0 = correct), pooled over
    seeds, with its hierarchical bootstrap interval."""
    if len(treatment) != len(control):
        raise ValueError("one treatment and one control array per seed")
    groups = []
    for t, c in zip(treatment, control):
        t, c = np.asarray(t, float), np.asarray(c, float)
        if t.shape != c.shape:
            raise ValueError(f"treatment and control must be scored on the same items: {t.shape} vs {c.shape}")
        groups.append({"treatment": t, "control": c})
    return bootstrap(groups, mean_difference, n_boot, confidence, seed)


@dataclass
class Verdict:
    verdict: str  # holds, fails or inconclusive
    claim: Claim
    interval: Interval
    needs: dict = field(default_factory=dict)  # inconclusive: seeds / items a difference of this size needs

    def line(self) -> str:
        iv = self.interval
        s = (
            f"{iv.estimate:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}] ({100 * iv.confidence:.0f}% CI, "
            f"{len(iv.per_seed)} seed{'s' if len(iv.per_seed) != 1 else ''}, {min(iv.n_items)} items"
            f"{' per seed' if len(iv.per_seed) > 1 else ''}; claim {self.claim.text()})"
        )
        if self.verdict == "inconclusive" and self.needs:
            s += "; " + self.needs["text"]
        return s

    def as_dict(self) -> dict:
        iv = self.interval
        return {
            "verdict": self.verdict,
            "claim": asdict(self.claim),
            "estimate": iv.estimate,
            "low": iv.low,
            "high": iv.high,
            "per_seed": iv.per_seed,
            "n_items": iv.n_items,
            "confidence": iv.confidence,
            "item_halfwidth": iv.item_halfwidth,
            "needs": self.needs,
            "text": self.line(),
        }


def decide(iv: Interval, claim: Claim) -> str:
    """holds / fails / inconclusive by the protocol's rule (module docstring)."""
    m, d = claim.margin, claim.direction
    if d == "+":
        if iv.low > -m and all(x > -m for x in iv.per_seed):
            return "holds"
        return "fails" if iv.high < -m else "inconclusive"
    if d == "-":
        if iv.high < m and all(x < m for x in iv.per_seed):
            return "holds"
        return "fails" if iv.low > m else "inconclusive"
    if -m < iv.low and iv.high < m:
        return "holds"
    return "fails" if iv.low > m or iv.high < -m else "inconclusive"


def needed(iv: Interval, claim: Claim) -> dict:
    """Roughly how many seeds, or items per seed, would make an interval around this estimate clear the
    nearest boundary of the claim. Normal approximation with two variance parts: within a seed (from the
    item-only interval; shrinks with more items) and between seeds (the per-seed estimates' spread beyond
    that; shrinks only with more seeds), so "more items alone would not do" when the seed part alone is
    wider than the distance. With one seed the seed part is unknown and so is the number of seeds."""
    from statistics import NormalDist

    m = claim.margin
    bounds = [-m] if claim.direction == "+" else [m] if claim.direction == "-" else [-m, m]
    dist = min(abs(iv.estimate - b) for b in bounds)
    out: dict = {"effect": iv.estimate, "distance": dist}
    if dist < 1e-9:
        out["text"] = f"effect {iv.estimate:+.4f} sits on the claim's boundary: no amount of data decides it"
        return out
    z = NormalDist().inv_cdf((1 + iv.confidence) / 2)
    S, n = len(iv.per_seed), min(iv.n_items)
    var_w = S * (iv.item_halfwidth / z) ** 2  # variance of one seed's estimate from its items
    var_s = max(float(np.var(iv.per_seed, ddof=1)) - var_w, 0.0) if S > 1 else 0.0
    target = (dist / z) ** 2  # the pooled estimate's variance must fall below this
    seeds = math.ceil((var_s + var_w) / target) if S > 1 else None
    room = S * target - var_s
    items = math.ceil(n * var_w / room) if room > 0 and var_w > 0 else None
    out["seeds"], out["items_per_seed"] = seeds, items
    far = 100  # beyond 100x the data the estimate is as good as "no amount of data"
    if seeds is None:
        parts = ["seeds: unknown from one seed (no seed spread measured)"]
    else:
        parts = [f"~{seeds} seeds" if seeds <= far * S else f"over {far * S} seeds"]
    if items is None:
        parts.append("more items alone would not do")
    else:
        parts.append(f"~{items:,} items per seed" if items <= far * n else f"over {far * n:,} items per seed")
    if claim.direction == "0":
        outcome = "hold" if abs(iv.estimate) < m else "fail"
    else:
        outcome = "hold" if (iv.estimate > -m if claim.direction == "+" else iv.estimate < m) else "fail"
    out["would"] = outcome
    out["text"] = f"effect {iv.estimate:+.4f}; for a difference of this size to {outcome} it would need " + " or ".join(
        parts
    )
    return out


def judge(iv: Interval, claim: Claim) -> Verdict:
    v = decide(iv, claim)
    return Verdict(v, claim, iv, needed(iv, claim) if v == "inconclusive" else {})
