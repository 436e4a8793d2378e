"""The cluster engine: the same operators on Ray actors (`--engine ray`), for pools beyond one machine.

One actor call per shard: each of `workers` actors loads the operator once, then takes shards one at a
time and runs the local engine's own `process_shard` on them (the same parsing, checks, error rows and
atomic per-shard files). There is no shuffle: a shard's files are written by the actor the moment that
shard is done, so a driver killed at 95% keeps 95% of the shards and a rerun skips them; an actor that
dies (killed, out of memory) is restarted and its shard retried. Connect to a running cluster with
`address="auto"` (or `ray://...`); by default a local Ray starts for the stage and stops after it.
"""

from __future__ import annotations

import os
import sys
import time

from ..ops import get_op
from ..pool import Pool, Shard
from ..progress import progress_bar
from .local import limit_threads, process_shard
from .stage import ShardResult, StageSummary, finish_stage, prepare_stage

# an actor that dies is restarted this many times, and the shard call it held retried (a worker kill)
ACTOR_RESTARTS = 3


class ShardWorker:
    """Ray actor: the operator, loaded once, run over whole shards (each written when it is done)."""

    def __init__(self, op: str, params: dict, threads: int):
        limit_threads(threads)
        self.op = get_op(op)(**params)
        self.outputs = get_op(op).outputs(params)

    def process(self, root: str, shard: Shard, stage: str, batch_size: int) -> ShardResult:
        return process_shard(Pool(root), shard, self.op, stage, batch_size, outputs=self.outputs)


def _start_ray(address: str | None, workers: int, cpus_per_actor: float):
    """Connect to `address`, or start a local Ray sized for the actors; True when it was started here.

    A local Ray gets the driver's sys.path (as the local engine's spawned workers do), so operators given
    as "module:Class" import the same code; on a cluster the code must be installed on every node."""
    import ray

    if ray.is_initialized():
        return False
    kw: dict = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **kw)
        return False
    # the workers inherit the raylet's environment (a runtime_env would cost a fresh worker, ~8 s here)
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        # "local": always a new Ray of our own, never a cluster that `ray start` left running on this machine
        ray.init(address="local", num_cpus=max(1, int(workers * cpus_per_actor)), **kw)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    return True


def _check_resources(num_cpus: float, num_gpus: float):
    """Actors that can never be placed would wait forever: say so instead."""
    import ray

    have = ray.cluster_resources()
    if num_gpus and have.get("GPU", 0) < num_gpus:
        raise RuntimeError(
            f"each actor asks for {num_gpus} GPU(s) but the Ray cluster has {have.get('GPU', 0)}: "
            f"run with --num-gpus 0 (CPU) or on a cluster with GPUs"
        )
    if have.get("CPU", 0) < num_cpus:
        raise RuntimeError(f"each actor asks for {num_cpus} CPU(s) but the Ray cluster has {have.get('CPU', 0)}")


def run_stage_ray(
    pool: Pool | str,
    op: str,
    params: dict | None = None,
    *,
    stage: str | None = None,
    workers: int = 1,
    batch_size: int = 64,
    shards: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
    address: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float = 0.0,
) -> StageSummary:
    """`run_stage` on Ray: `workers` operator actors, each reserving `num_cpus` CPUs and `num_gpus` GPUs.

    `workers` means what it means locally (operator copies working on shards at once). `num_cpus`
    defaults to cores // workers on a local Ray (the local engine's split) and 1 on a cluster; `threads`
    per actor defaults to `num_cpus`. The same files, error rows and counts as the local engine."""
    import ray

    pool = pool if isinstance(pool, Pool) else Pool(pool)
    params = dict(params or {})
    stage = stage or op
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.time()
    op_cls, all_shards, todo = prepare_stage(pool, op, params, stage, shards, overwrite)
    results: list[ShardResult] = []
    if todo:
        if num_cpus is None:
            num_cpus = 1.0 if address else float(max(1, (os.cpu_count() or 1) // workers))
        started = _start_ray(address, workers, num_cpus)
        try:
            _check_resources(num_cpus, num_gpus)
            results = _run_actors(
                pool,
                todo,
                op,
                params,
                stage,
                workers,
                batch_size,
                progress,
                threads or max(1, int(num_cpus)),
                num_cpus,
                num_gpus,
            )
        finally:
            if started:
                ray.shutdown()
    return finish_stage(pool, stage, all_shards, todo, results, t0)


def _run_actors(pool, todo, op, params, stage, workers, batch_size, progress, threads, num_cpus, num_gpus):
    """Keep every actor busy with one shard until none is left; a shard is written when its call ends."""
    import ray
    from ray.exceptions import RayError

    actor_cls = ray.remote(ShardWorker).options(
        num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS
    )
    actors = [actor_cls.remote(op, params, threads) for _ in range(min(workers, len(todo)))]
    queue = list(todo)
    running: dict = {}
    results: list[ShardResult] = []
    bar = progress_bar(total=len(todo), desc=stage, unit="shard", disable=not progress)

    def submit(actor):
        shard = queue.pop(0)
        running[actor.process.remote(str(pool.root), shard, stage, batch_size)] = (actor, shard)

    try:
        for a in actors:
            submit(a)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, shard = running.pop(ref)
            try:
                results.append(ray.get(ref))
            except RayError as e:
                raise RuntimeError(
                    f"stage {stage!r}, shard {shard.id} failed on Ray ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[-1]}) — finished shards are kept; rerun to resume"
                ) from None
            bar.update(1)
            if queue:
                submit(actor)
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)
    return results
