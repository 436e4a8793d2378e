"""`unparrot demo`: the pipeline on a synthetic world. For now: generate the world and show its statistics."""

from __future__ import annotations

import os

from .engine import run_stage
from .synth.generate import synth
from .synth.stats import format_truth_stats, truth_stats

SIZES = {"small": 2000, "default": 10000, "full": 10000, "large": 40000}


def demo(out: str = "demo-out", size: str = "default", seed: int = 0, workers: int = 2) -> dict:
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; one of {', '.join(SIZES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pool = os.path.join(out, "pool")
    print(f"[1/2] synthetic world: {SIZES[size]} pairs (preset learnable, seed {seed}) -> {pool}")
    s = synth(pool, n=SIZES[size], preset="learnable", seed=seed, workers=workers)
    print(f"      {s['samples']} pairs in {s['shards']} shards, evaluation sets: {', '.join(s['eval_sets'])}")
    print("[2/2] decode check of every sample (inspect stage)")
    summary = run_stage(pool, "inspect", workers=workers)
    print("      " + summary.line())
    stats = truth_stats(pool)
    print(format_truth_stats(stats))
    return stats
