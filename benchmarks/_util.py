"""Helpers shared by the benchmark scripts: timing, RSS, a cached synthetic pool, ratio lines."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM: reset at exec, unlike ru_maxrss, which a child inherits)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_pool(name: str, n: int, preset: str = "learnable", **kw) -> Path:
    """A pool generated once and reused by later benchmark runs."""
    from unparrot.synth.generate import synth

    root = OUT / name
    synth(root, n=n, preset=preset, seed=0, eval_sets=kw.pop("eval_sets", ()), progress=False, **kw)
    return root


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def report(name: str, ours: float, base: float, unit: str, target: float, higher_is_better: bool = True) -> bool:
    ratio = ours / base if base else float("inf")
    ok = ratio >= target if higher_is_better else ratio <= target
    sign = ">=" if higher_is_better else "<="
    print(
        f"{name}: ours {ours:.1f} {unit}, baseline {base:.1f} {unit}, ratio {ratio:.2f} "
        f"(target {sign} {target}) {'OK' if ok else 'MISSED'}"
    )
    return ok
