"""The local engine: an operator over every shard of a pool, one shard per worker process at a time.

Memory is bounded by one batch of encoded images per worker. Each shard's output is written atomically
when the shard is done, so a killed run re-run skips finished shards and ends with exactly the files of an
uninterrupted run (operators are deterministic for fixed parameters).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..flags import option
from ..io.tar import count_samples
from ..ops import get_op
from ..ops.base import Outputs
from ..pool import Pool, Shard, source_stamp
from ..progress import progress_bar
from .stage import ShardResult, StageSummary, finish_stage, prepare_stage


BATCH_FIELDS = ("uid", "key", "shard", "image", "image_ext", "caption", "meta")  # what an operator sees


def process_shard(
    pool: Pool,
    shard: Shard,
    op,
    stage: str,
    batch_size: int = 64,
    on_progress: Callable[[int], None] | None = None,
    outputs: Outputs | None = None,
) -> ShardResult:
    """Run `op` over one shard and write its columns and errors. Returns the shard's counts.

    `outputs` (the operator's declared columns and embeddings) types a shard with no processed sample.
    Both engines call it (the Ray actors too), so a shard's files are the same whichever ran it."""
    res = ShardResult(shard.id)
    stamp = source_stamp(shard.path) if os.path.exists(shard.path) else None  # the tar as it is read
    input_cols = [c for cols in op.inputs.values() for c in cols if c != "uid"]
    errors: list[dict] = []
    out_cols: dict[str, list] = {}
    pending: list[dict] = []

    def flush():
        if pending:
            kept = _run_batch(op, pending, input_cols, errors, out_cols)
            res.n_ok += kept
            res.n_err += len(pending) - kept
            if on_progress:
                on_progress(len(pending))
            pending.clear()

    for row, reason, problem in pool.rows(shard, op.inputs, op.needs):
        if problem is not None:
            res.problems.append(_problem_line(shard, row, reason, problem))
        if row is None:
            errors.append({"uid": None, "key": problem.after_key, "reason": reason})
            continue
        res.n_in += 1
        if reason is not None:
            errors.append({"uid": row["uid"], "key": row["key"], "reason": reason})
            res.n_err += 1
            if on_progress:
                on_progress(1)
            continue
        pending.append(row)
        if len(pending) >= batch_size:
            flush()
    flush()
    o = outputs or Outputs()
    pool.write_columns(
        stage, shard.id, _gathered(out_cols), errors, schema=o.columns, embedding_dims=o.embeddings, stamp=stamp
    )
    return res


def _problem_line(shard: Shard, row, reason, problem) -> str:
    """The summary's line for a broken tar: between samples (row None) or inside one."""
    where = (
        f" (after key {problem.after_key})"
        if row is None and problem.after_key
        else (f" (in sample {problem.key})" if row is not None else "")
    )
    return f"shard {shard.id}: {reason if row is None else problem.problem}{where}"


def _run_batch(op, pending: list[dict], input_cols: list[str], errors: list, out_cols: dict) -> int:
    """One operator call over `pending` rows: its rows with an `error` go to `errors`, the others' columns
    are appended to `out_cols` (2-D arrays as blocks, concatenated once at the end). Returns the rows kept."""
    batch = {k: [r.get(k) for r in pending] for k in BATCH_FIELDS}
    for c in input_cols:
        vals = [r[c] for r in pending]
        batch[c] = np.stack(vals) if vals and isinstance(vals[0], np.ndarray) else vals
    out = op(batch)
    n = len(pending)
    bad = {k: len(v) for k, v in out.items() if len(v) != n}
    if bad:
        raise RuntimeError(f"operator {type(op).__name__} returned columns of wrong length {bad} for {n} rows")
    errs = out.get("error") or [None] * n
    keep = [i for i in range(n) if not errs[i]]
    for i in range(n):
        if errs[i]:
            errors.append({"uid": pending[i]["uid"], "key": pending[i]["key"], "reason": str(errs[i])})
    out_cols.setdefault("uid", []).extend(pending[i]["uid"] for i in keep)
    out_cols.setdefault("key", []).extend(pending[i]["key"] for i in keep)
    for k, v in out.items():
        if k in ("error", "uid", "key"):
            continue
        if isinstance(v, np.ndarray) and v.ndim == 2:
            out_cols.setdefault(k, []).append(v[keep])
        else:
            out_cols.setdefault(k, []).extend(v[i] for i in keep)
    return len(keep)


def _gathered(out_cols: dict) -> dict:
    """The shard's columns: 2-D blocks concatenated; no processed sample gives just the keys, empty."""
    columns = {}
    for k, v in out_cols.items():
        columns[k] = np.concatenate(v) if v and isinstance(v[0], np.ndarray) and v[0].ndim == 2 else v
    return columns if "uid" in columns else {"uid": [], "key": []}


# ---- worker processes ---------------------------------------------------------------------------
_WORKER: dict = {}


def limit_threads(threads: int):
    """Cap a worker's BLAS/OpenMP/torch threads, so `workers` x `threads` does not oversubscribe the cores
    (both engines call it once per worker, before the operator loads)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def _init_worker(op_name, params, threads, queue):
    """Runs once in each worker process: the thread cap, then the operator (loaded once per process)."""
    limit_threads(threads)
    _WORKER["op"] = get_op(op_name)(**params)
    _WORKER["outputs"] = get_op(op_name).outputs(params)
    _WORKER["queue"] = queue


def _run_in_worker(pool_root: str, shard: Shard, stage: str, batch_size: int) -> ShardResult:
    """One shard in a worker process, with the operator its initializer loaded."""
    q = _WORKER["queue"]
    return process_shard(
        Pool(pool_root), shard, _WORKER["op"], stage, batch_size, on_progress=q.put, outputs=_WORKER["outputs"]
    )


@dataclass
class StageConfig:
    """A per-sample stage run's own options (the engine's are EngineConfig's); `run_stage`'s defaults."""

    stage: str | None = option(None, "output stage name (default: the operator name)")
    batch_size: int = option(64, "samples per operator call")
    overwrite: bool = option(False, "recompute a stage made with other parameters")


def run_stage(
    pool: Pool | str,
    op: str,
    params: dict | None = None,
    *,
    stage: str | None = StageConfig.stage,
    workers: int = 1,
    batch_size: int = StageConfig.batch_size,
    shards: list[str] | None = None,
    overwrite: bool = StageConfig.overwrite,
    progress: bool = True,
    threads: int | None = None,
) -> StageSummary:
    """Run operator `op` (a registry name or "module:Class") with `params` over a pool's shards.

    Writes columns/<stage>/, errors/<stage>/ (and embeddings/<stage>/ for array outputs); `stage`
    defaults to the operator name. Shards already done are skipped. `workers` processes each load the
    operator once; `threads` per worker defaults to cores // workers.
    """
    t0 = time.time()
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    params = dict(params or {})
    stage = stage or op
    op_cls, all_shards, todo = prepare_stage(pool, op, params, stage, shards, overwrite)
    bar = progress_bar(total=None, desc=stage, unit="img", disable=not progress)
    _count_in_background(todo, bar)
    results: list[ShardResult] = []
    setup = 0.0
    try:
        if todo and (workers <= 1 or len(todo) == 1):
            results, setup = _run_in_process(pool, todo, op_cls, params, stage, batch_size, bar)
        elif todo:
            threads = threads or max(1, (os.cpu_count() or 1) // workers)
            results = _run_parallel(pool, todo, op, params, stage, workers, batch_size, bar, threads)
    finally:
        bar.close()
    return finish_stage(pool, stage, all_shards, todo, results, t0, setup_seconds=setup)


def _run_in_process(pool, todo, op_cls, params, stage, batch_size, bar) -> tuple[list[ShardResult], float]:
    """One worker: the operator loaded here, the shards one after the other (no process start-up, and
    the model's loading time measured apart, so the summary's rate is that of the work). Returns the
    shards' results and the loading time."""
    t_setup = time.time()
    op_obj = op_cls(**params)
    setup = time.time() - t_setup
    outputs = op_cls.outputs(params)
    results = [
        process_shard(pool, sh, op_obj, stage, batch_size, on_progress=bar.update, outputs=outputs) for sh in todo
    ]
    return results, setup


def _run_parallel(pool, todo, op, params, stage, workers, batch_size, bar, threads) -> list[ShardResult]:
    """`workers` spawned processes, each loading the operator once and taking one shard at a time; their
    progress comes back through a queue. A dead worker ends the stage with a message that says finished
    shards are kept (a rerun resumes), or with the operator's own error when it cannot even start."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    stop = threading.Event()

    def drain():
        while not stop.is_set():
            try:
                bar.update(queue.get(timeout=0.2))
            except Exception:
                pass

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    results = []
    try:
        with ProcessPoolExecutor(
            max_workers=min(workers, len(todo)),
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(op, params, threads, queue),
        ) as ex:
            futs = {ex.submit(_run_in_worker, str(pool.root), sh, stage, batch_size): sh for sh in todo}
            pending = set(futs)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    results.append(f.result())
    except BrokenProcessPool as e:
        if not results:  # maybe the operator itself cannot start: surface its own error
            get_op(op)(**params)
        raise RuntimeError(
            f"a worker process of stage {stage!r} died (killed, or out of memory) — finished shards are "
            f"kept; rerun the same command to resume"
        ) from e
    finally:
        stop.set()
        t.join(timeout=2)
        while True:  # whatever progress is still queued
            try:
                bar.update(queue.get_nowait())
            except Exception:
                break
    return results


def _count_in_background(shards: list[Shard], bar):
    """Fill in the progress bar's total (for the ETA) by scanning tar headers, without delaying work."""
    if bar.disable:
        return

    def count():
        total = 0
        for s in shards:
            total += count_samples(s.path)
        bar.total = total
        bar.refresh()

    threading.Thread(target=count, daemon=True).start()


__all__ = ["run_stage", "process_shard", "limit_threads"]
