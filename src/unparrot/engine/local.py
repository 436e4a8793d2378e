"""The local engine: an operator over every shard of a pool, one shard per worker process at a time.

Memory is bounded by one batch of encoded images per worker. Each shard's output is written atomically
when the shard is done, so a killed run re-run skips finished shards and ends with exactly the files of an
uninterrupted run (operators are deterministic for fixed parameters).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..flags import option
from ..io.samples import parse_sample
from ..io.tar import ShardProblem, count_samples, iter_samples
from ..ops import get_op
from ..ops.base import Outputs
from ..pool import Pool, Shard, atomic_write_table, remove_stale_temp, source_stamp, to_arrow, write_errors
from ..progress import progress_bar


class StageConflict(RuntimeError):
    """The stage already holds output made with other parameters."""


@dataclass
class ShardResult:
    shard: str
    n_in: int = 0
    n_ok: int = 0
    n_err: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class StageSummary:
    stage: str
    shards: int
    skipped: int
    n_in: int
    n_ok: int
    n_err: int
    seconds: float
    problems: list[str] = field(default_factory=list)
    error_dir: str = ""
    setup_seconds: float = 0.0  # loading the operator (models) in-process; excluded from the rate

    def line(self) -> str:
        work = self.seconds - self.setup_seconds
        rate = self.n_in / work if work > 0 else 0.0
        s = (
            f"{self.stage}: {self.shards} shards ({self.skipped} already done), {self.n_in} samples: "
            f"{self.n_ok} processed, {self.n_err} errors in {self.seconds:.1f}s ({rate:.1f} samples/s)"
        )
        if self.n_err:
            s += f"; errors in {self.error_dir}"
        if self.problems:
            s += f"; {len(self.problems)} shard problem(s): {self.problems[0]}"
        return s


def iter_pool_samples(pool: Pool, shards: list[Shard] | None = None) -> Iterator[dict]:
    """Every parsed sample row of a pool, in shard order (shard problems are skipped silently here)."""
    for sh in shards if shards is not None else pool.shards():
        for item in iter_samples(sh.path):
            if not isinstance(item, ShardProblem):
                yield parse_sample(item, sh.id)


def read_inputs(pool: Pool, stage: str, shard: str, cols) -> dict:
    """Columns of an earlier stage for one shard; a name that is not a parquet column is read from the
    stage's embeddings (`embeddings/<stage>/<shard>.<name>.npy`, rows aligned with the parquet)."""
    import pyarrow.parquet as pq

    names = set(pq.read_schema(pool.column_path(stage, shard)).names)
    out = pool.read_columns(stage, shard, ["uid"] + [c for c in cols if c in names and c != "uid"]).to_pydict()
    for c in cols:
        if c not in names:
            p = pool.embedding_path(stage, shard, c)
            if not p.exists():
                if not out["uid"]:  # a 0-row file from an operator that declares no schema: nothing to read
                    out[c] = []
                    continue
                raise KeyError(f"stage {stage!r} has no column or embedding {c!r} (shard {shard})")
            out[c] = np.load(p)
    return out


def shard_rows(pool: Pool, shard: Shard, needs, input_spec: dict) -> Iterator[tuple]:
    """Every sample of a shard as (row, reason, problem): `row` is the parsed sample with the columns of the
    input stages merged in; `reason` says why it cannot be processed (None when it can); `problem` is set
    for a tar broken between samples (row None) or inside this sample. Both engines use it."""
    inputs = {st: read_inputs(pool, st, shard.id, cols) for st, cols in input_spec.items()}
    index = {st: {u: i for i, u in enumerate(cols["uid"])} for st, cols in inputs.items()}
    seen: dict[str, str] = {}
    for item in iter_samples(shard.path):
        if isinstance(item, ShardProblem):
            yield None, item.reason, item
            continue
        row = parse_sample(item, shard.id)
        probs = row["problems"]
        reason = probs.get("sample") or next((probs[f] for f in needs if f in probs), None)
        if reason is None and row["uid"] in seen:
            reason = f"duplicate uid {row['uid']} (first at key {seen[row['uid']]} of this shard)"
        missing = [st for st in inputs if row["uid"] not in index[st]]
        if reason is None and missing:
            reason = f"no {missing[0]!r} output for this sample (see errors/{missing[0]})"
        if reason is None:
            seen[row["uid"]] = row["key"]
            for st, cols in inputs.items():
                i = index[st][row["uid"]]
                row.update({c: v[i] for c, v in cols.items() if c != "uid"})
        yield row, reason, item if item.broke_shard else None


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

    `outputs` (the operator's declared columns and embeddings) types a shard with no processed sample."""
    res = ShardResult(shard.id)
    stamp = source_stamp(shard.path) if os.path.exists(shard.path) else None  # the tar as it is read
    input_cols = [c for cols in op.inputs.values() for c in cols if c != "uid"]
    errors: list[dict] = []
    out_cols: dict[str, list] = {}
    pending: list[dict] = []

    def flush():
        if not pending:
            return
        batch = {
            k: [r.get(k) for r in pending] for k in ("uid", "key", "shard", "image", "image_ext", "caption", "meta")
        }
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
        res.n_ok += len(keep)
        res.n_err += n - len(keep)
        if on_progress:
            on_progress(n)
        pending.clear()

    for row, reason, problem in shard_rows(pool, shard, op.needs, op.inputs):
        if problem is not None:
            where = (
                f" (after key {problem.after_key})"
                if row is None and problem.after_key
                else (f" (in sample {problem.key})" if row is not None else "")
            )
            res.problems.append(f"shard {shard.id}: {reason if row is None else problem.problem}{where}")
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
    columns = {}
    for k, v in out_cols.items():
        columns[k] = np.concatenate(v) if v and isinstance(v[0], np.ndarray) and v[0].ndim == 2 else v
    if "uid" not in columns:
        columns = {"uid": [], "key": []}
    o = outputs or Outputs()
    pool.write_columns(
        stage, shard.id, columns, errors, schema=o.columns, embedding_dims=o.embeddings, stamp=stamp
    )
    return res


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
    limit_threads(threads)
    _WORKER["op"] = get_op(op_name)(**params)
    _WORKER["outputs"] = get_op(op_name).outputs(params)
    _WORKER["queue"] = queue


def _run_in_worker(pool_root: str, shard: Shard, stage: str, batch_size: int) -> ShardResult:
    q = _WORKER["queue"]
    return process_shard(
        Pool(pool_root), shard, _WORKER["op"], stage, batch_size, on_progress=q.put, outputs=_WORKER["outputs"]
    )


def _check_stage(pool: Pool, stage: str, record: dict, overwrite: bool):
    info = pool.stage_info(stage)
    if overwrite:
        for sub in ("columns", "errors", "embeddings"):
            shutil.rmtree(pool.root / sub / stage, ignore_errors=True)
    elif info is not None and info != record:
        raise StageConflict(
            f"stage {stage!r} in {pool.root} was made with {json.dumps(info, sort_keys=True)}, not "
            f"{json.dumps(record, sort_keys=True)}: pass overwrite=True (--overwrite) to recompute it, or "
            f"name the new output differently (--stage NAME)"
        )
    remove_stale_temp(*(pool.root / sub / stage for sub in ("columns", "errors", "embeddings")))
    p = pool.root / "columns" / stage / "_stage.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(record, sort_keys=True, indent=1))


def prepare_stage(pool: Pool, op: str, params: dict, stage: str, shards, overwrite: bool):
    """Checks every engine makes before any work: the operator and its parameters, the shards, the input
    stages, the stage record. Returns (operator class, selected shards, shards still to do)."""
    op_cls = get_op(op)
    all_shards = pool.shards()
    if shards is not None:
        wanted = set(shards)
        unknown = wanted - {s.id for s in all_shards}
        if unknown:
            raise KeyError(f"unknown shards {sorted(unknown)[:5]} in {pool.root}")
        all_shards = [s for s in all_shards if s.id in wanted]
    if not all_shards:
        raise FileNotFoundError(f"no shards found in {pool.root} (expected shards/*.tar or pool.yaml)")
    record = {"op": op, "version": op_cls.version, "params": bind_params(op_cls, params)}
    for st in op_cls.inputs_for(params):
        missing = [s.id for s in all_shards if not pool.column_path(st, s.id).exists()]
        if missing:
            raise FileNotFoundError(
                f"stage {stage!r} needs stage {st!r} first; it is missing for "
                f"{len(missing)} shard(s), e.g. {missing[0]}"
            )
    _check_stage(pool, stage, record, overwrite)
    # a shard repaired or replaced since its output was written is done again
    done = set(pool.done_shards(stage)) - set(pool.changed_shards(stage, all_shards))
    return op_cls, all_shards, [s for s in all_shards if s.id not in done]


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
    results: list[ShardResult] = []
    bar = progress_bar(total=None, desc=stage, unit="img", disable=not progress)
    _count_in_background(todo, bar)
    setup = 0.0
    try:
        if todo and (workers <= 1 or len(todo) == 1):
            t_setup = time.time()
            op_obj = op_cls(**params)
            setup = time.time() - t_setup
            outputs = op_cls.outputs(params)
            for sh in todo:
                results.append(
                    process_shard(pool, sh, op_obj, stage, batch_size, on_progress=bar.update, outputs=outputs)
                )
        elif todo:
            threads = threads or max(1, (os.cpu_count() or 1) // workers)
            results = _run_parallel(pool, todo, op, params, stage, workers, batch_size, bar, threads)
    finally:
        bar.close()
    problems = [p for r in results for p in r.problems]
    _move_cross_shard_duplicates(pool, stage)
    counts = stage_counts(pool, stage, [s.id for s in all_shards])
    return StageSummary(
        stage=stage,
        shards=len(all_shards),
        skipped=len(all_shards) - len(todo),
        n_in=counts["n_in"],
        n_ok=counts["n_ok"],
        n_err=counts["n_err"],
        seconds=time.time() - t0,
        problems=problems,
        error_dir=str(pool.root / "errors" / stage),
        setup_seconds=setup,
    )


def bind_params(op_cls, params: dict) -> dict:
    """The operator's full parameters (defaults filled in), checked against its signature up front."""
    import inspect

    try:
        bound = inspect.signature(op_cls.__init__).bind(None, **params)
    except TypeError as e:
        raise TypeError(f"bad parameters for operator {op_cls.__name__}: {e}") from None
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop(next(iter(out)))  # self
    out.update(out.pop("kwargs", {}))
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def _run_parallel(pool, todo, op, params, stage, workers, batch_size, bar, threads) -> list[ShardResult]:
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


def stage_counts(pool: Pool, stage: str, shard_ids: list[str]) -> dict:
    """n_in / n_ok / n_err of a stage over shards, from its files (so resumed runs count everything)."""
    import pyarrow.parquet as pq

    n_ok = n_err = 0
    for sid in shard_ids:
        p = pool.column_path(stage, sid)
        if p.exists():
            n_ok += pq.read_metadata(p).num_rows
        e = pool.error_path(stage, sid)
        if e.exists():
            uids = pq.read_table(e, columns=["uid"]).column("uid")
            n_err += len(uids) - uids.null_count  # shard-level problems have no uid and are not samples
    return {"n_in": n_ok + n_err, "n_ok": n_ok, "n_err": n_err}


def _move_cross_shard_duplicates(pool: Pool, stage: str):
    """A uid seen in an earlier shard (by shard id order) is an error row in later shards.

    Its stamp (removed whenever a shard's output is written) lets a rerun with nothing new skip it; a run
    killed inside it leaves no stamp and the next run finishes it. Each step is idempotent: error rows are
    added once, embeddings are trimmed only while they still have the table's length, the table last."""
    import pyarrow.parquet as pq

    from ..pool import CROSS_SHARD_STAMP, atomic_save_npy, atomic_write_bytes

    stamp = pool.root / "columns" / stage / CROSS_SHARD_STAMP
    if stamp.exists() or not stamp.parent.exists():
        return
    first: dict[str, str] = {}
    for sid in pool.done_shards(stage):
        uids = pq.read_table(pool.column_path(stage, sid), columns=["uid"]).column("uid").to_pylist()
        dup = [i for i, u in enumerate(uids) if u in first]
        for u in uids:
            first.setdefault(u, sid)
        if not dup:
            continue
        table = pool.read_columns(stage, sid)
        keep = np.setdiff1d(np.arange(len(uids)), dup)
        keys = table.column("key").to_pylist()
        err_path = pool.error_path(stage, sid)
        old = pq.read_table(err_path).to_pylist() if err_path.exists() else []
        seen = {(r["uid"], r["reason"]) for r in old}
        new = [
            {"uid": uids[i], "key": keys[i], "reason": f"duplicate uid {uids[i]} (first in shard {first[uids[i]]})"}
            for i in dup
        ]
        new = [r for r in new if (r["uid"], r["reason"]) not in seen]
        if new:
            write_errors(err_path, stage, sid, old + new)
        for p in (pool.root / "embeddings" / stage).glob(f"{sid}.*.npy"):
            arr = np.load(p, mmap_mode="r")
            if len(arr) == len(uids):  # not trimmed yet
                atomic_save_npy(p, np.asarray(arr[keep]))
        atomic_write_table(pool.column_path(stage, sid), table.take(keep))
    atomic_write_bytes(stamp, b"")


__all__ = [
    "run_stage",
    "process_shard",
    "StageSummary",
    "StageConflict",
    "iter_pool_samples",
    "to_arrow",
    "stage_counts",
    "limit_threads",
]
