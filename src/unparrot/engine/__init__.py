"""Engines run per-sample operators over a pool: `local` (default, worker processes on this machine) and
`ray` (Ray Data actors, for clusters)."""

from __future__ import annotations

from .local import StageConflict, StageSummary, run_stage


def _ray(*a, **kw):
    from .ray import run_stage_ray

    return run_stage_ray(*a, **kw)


ENGINES = {"local": run_stage, "ray": _ray}


def run(pool, op: str, params: dict | None = None, *, engine: str = "local", **kw) -> StageSummary:
    """Run operator `op` over `pool` with the chosen engine (see `run_stage` for the keyword arguments)."""
    if engine not in ENGINES:
        raise KeyError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    return ENGINES[engine](pool, op, params, **kw)


__all__ = ["run", "run_stage", "StageSummary", "StageConflict", "ENGINES"]
