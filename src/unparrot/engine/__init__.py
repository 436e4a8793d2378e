"""Engines run per-sample operators over a pool: `local` (default, worker processes on this machine) and
`ray` (Ray actors, one shard per call, for clusters). Both keep their books through `stage` (the stage
record, resume decisions, the cross-shard duplicate pass, counts and summaries)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..flags import option
from .local import StageConfig, run_stage
from .stage import StageConflict, StageSummary


@dataclass
class EngineConfig:
    """Where and how wide a per-sample stage runs. Every engine default lives here: `run()` and the CLI's
    engine flags (generated from these fields) both read them, so the two cannot drift apart.

    `workers` means the same on both engines: operator copies working on shards at once (local: worker
    processes; Ray: actors). The Ray-only fields are refused on the local engine rather than ignored."""

    engine: str = option("local", "local (worker processes) or ray (Ray actors, one shard per call; docs/scale.md)")
    workers: int = option(1, "operator copies working on shards at once (local: processes; ray: actors)")
    threads: int | None = option(None, "threads per worker (default: cores / workers; ray: --num-cpus)")
    address: str | None = option(
        None, "ray: cluster to join (auto, ray://HOST:10001); default: a local Ray for this stage"
    )
    num_cpus: float | None = option(
        None, "ray: CPUs each actor reserves (default: cores / workers locally, 1 on a cluster)"
    )
    num_gpus: float = option(0.0, "ray: GPUs each actor reserves (fractions share a GPU)")

    def validate(self) -> "EngineConfig":
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; known: {', '.join(ENGINES)}")
        if self.workers < 1 or (self.threads is not None and self.threads < 1):
            raise ValueError(f"workers and threads must be >= 1, got {self.workers} and {self.threads}")
        if self.num_gpus < 0 or (self.num_cpus is not None and self.num_cpus <= 0):
            raise ValueError(f"num_gpus must be >= 0 and num_cpus > 0, got {self.num_gpus} and {self.num_cpus}")
        ray_only = [f for f in ("address", "num_cpus") if getattr(self, f) is not None] + (
            ["num_gpus"] if self.num_gpus else []
        )
        if self.engine != "ray" and ray_only:
            raise ValueError(f"{', '.join(ray_only)} are options of the ray engine (pass engine='ray' / --engine ray)")
        return self

    def run_kwargs(self) -> dict:
        """The keyword arguments of this engine's stage runner."""
        kw = {"workers": self.workers, "threads": self.threads}
        if self.engine == "ray":
            kw.update(address=self.address, num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        return kw


def _ray(*a, **kw):
    from .ray import run_stage_ray

    return run_stage_ray(*a, **kw)


ENGINES = {"local": run_stage, "ray": _ray}


def run(pool, op: str, params: dict | None = None, *, engine: str = "local", **kw) -> StageSummary:
    """Run operator `op` over `pool` with the chosen engine. The `EngineConfig` fields (workers, threads,
    address, num_cpus, num_gpus) take its defaults; the rest are `run_stage`'s (stage, batch_size, ...)."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    cfg = EngineConfig(engine=engine, **{k: kw.pop(k) for k in list(kw) if k in names}).validate()
    return ENGINES[cfg.engine](pool, op, params, **cfg.run_kwargs(), **kw)


__all__ = ["run", "run_stage", "StageSummary", "StageConflict", "ENGINES", "EngineConfig", "StageConfig"]
