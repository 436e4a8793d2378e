"""Engines run per-sample operators over a pool. `local` (default) uses worker processes on this machine."""

from __future__ import annotations

from .local import StageConflict, StageSummary, run_stage

ENGINES = {"local": run_stage}


def run(pool, op: str, params: dict | None = None, *, engine: str = "local", **kw) -> StageSummary:
    """Run operator `op` over `pool` with the chosen engine (see `run_stage` for the keyword arguments)."""
    if engine not in ENGINES:
        raise KeyError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    return ENGINES[engine](pool, op, params, **kw)


__all__ = ["run", "run_stage", "StageSummary", "StageConflict", "ENGINES"]
