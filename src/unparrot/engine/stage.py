"""Stage bookkeeping shared by every engine and by the whole-pool stages that write per-shard columns
(`rewrite`): the stage record and its conflicts, parameter binding, the checks made before any work, the
cross-shard duplicate pass, the counts and the summaries.

It lives apart from either engine so that the local process pool, the Ray actors and `rewrite` keep one
set of rules: the same `_stage.json`, the same resume decisions, the same error rows and counts, whichever
of them wrote a stage (a stage started locally can be finished on a cluster).
"""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import dataclass, field

import numpy as np

from ..ops import get_op
from ..pool import (
    CROSS_SHARD_STAMP,
    FirstSeen,
    Pool,
    Shard,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_table,
    remove_stale_temp,
    write_errors,
)


class StageConflict(RuntimeError):
    """The stage already holds output made with other parameters."""


@dataclass
class ShardResult:
    """One shard's counts and tar problems, as a worker (process or actor) hands them back."""

    shard: str
    n_in: int = 0
    n_ok: int = 0
    n_err: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class StageSummary:
    """What a stage run did, counted from the stage's files (so a resumed run counts every shard)."""

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


def bind_params(op_cls, params: dict) -> dict:
    """The operator's full parameters (defaults filled in), checked against its signature up front: the
    stage record holds them all, so a later change of a default is a conflict rather than a silent mix."""
    try:
        bound = inspect.signature(op_cls.__init__).bind(None, **params)
    except TypeError as e:
        raise TypeError(f"bad parameters for operator {op_cls.__name__}: {e}") from None
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop(next(iter(out)))  # self
    out.update(out.pop("kwargs", {}))
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def claim_stage(pool: Pool, stage: str, record: dict, overwrite: bool):
    """Make `stage` the output of `record` (operator, version, parameters) before any work.

    Output made with another record is a `StageConflict` (a stage never mixes shards of two parameter
    sets), unless `overwrite` removes it. The temporary files a killed run left are removed, so a rerun
    ends with exactly the files of an uninterrupted run; then the record is written."""
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


def shards_to_do(pool: Pool, stage: str, shards: list[Shard]) -> list[Shard]:
    """The `shards` without current output: not done yet, or whose tar was repaired or replaced since."""
    done = set(pool.done_shards(stage)) - set(pool.changed_shards(stage, shards))
    return [s for s in shards if s.id not in done]


def select_shards(pool: Pool, shards: list[str] | None = None) -> list[Shard]:
    """The pool's shards, or those named by `shards` (an unknown id is an error, not an empty run)."""
    all_shards = pool.shards()
    if shards is not None:
        wanted = set(shards)
        unknown = wanted - {s.id for s in all_shards}
        if unknown:
            raise KeyError(f"unknown shards {sorted(unknown)[:5]} in {pool.root}")
        all_shards = [s for s in all_shards if s.id in wanted]
    if not all_shards:
        raise FileNotFoundError(f"no shards found in {pool.root} (expected shards/*.tar or pool.yaml)")
    return all_shards


def prepare_stage(pool: Pool, op: str, params: dict, stage: str, shards, overwrite: bool):
    """Checks every engine makes before any work: the operator and its parameters, the shards, the input
    stages, the stage record. Returns (operator class, selected shards, shards still to do)."""
    op_cls = get_op(op)
    all_shards = select_shards(pool, shards)
    record = {"op": op, "version": op_cls.version, "params": bind_params(op_cls, params)}
    for st in op_cls.inputs_for(params):
        missing = [s.id for s in all_shards if not pool.column_path(st, s.id).exists()]
        if missing:
            raise FileNotFoundError(
                f"stage {stage!r} needs stage {st!r} first; it is missing for "
                f"{len(missing)} shard(s), e.g. {missing[0]}"
            )
    claim_stage(pool, stage, record, overwrite)
    return op_cls, all_shards, shards_to_do(pool, stage, all_shards)


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


def finish_stage(
    pool: Pool,
    stage: str,
    all_shards: list[Shard],
    todo: list[Shard],
    results: list[ShardResult],
    t0: float,
    setup_seconds: float = 0.0,
) -> StageSummary:
    """An engine's last step: the cross-shard duplicate pass, then the summary counted from the files."""
    import time

    move_cross_shard_duplicates(pool, stage)
    counts = stage_counts(pool, stage, [s.id for s in all_shards])
    return StageSummary(
        stage=stage,
        shards=len(all_shards),
        skipped=len(all_shards) - len(todo),
        n_in=counts["n_in"],
        n_ok=counts["n_ok"],
        n_err=counts["n_err"],
        seconds=time.time() - t0,
        problems=[p for r in results for p in r.problems],
        error_dir=str(pool.root / "errors" / stage),
        setup_seconds=setup_seconds,
    )


def move_cross_shard_duplicates(pool: Pool, stage: str):
    """A uid seen in an earlier shard (by shard id order) is an error row in later shards.

    Shards are processed independently (by processes, actors, or in several runs), so this is checked
    once they are written. Its stamp (removed whenever a shard's output is written) lets a rerun with
    nothing new skip it; a run killed inside it leaves no stamp and the next run finishes it. Each step is
    idempotent: error rows are added once, embeddings are trimmed only while they still have the table's
    length, the table last."""
    import pyarrow.parquet as pq

    stamp = pool.root / "columns" / stage / CROSS_SHARD_STAMP
    if stamp.exists() or not stamp.parent.exists():
        return
    seen = FirstSeen()
    for sid in pool.done_shards(stage):
        uids = pq.read_table(pool.column_path(stage, sid), columns=["uid"]).column("uid").to_pylist()
        reasons = [seen.duplicate(u, sid) for u in uids]
        for u in uids:
            seen.keep(u, sid)
        dup = [i for i, r in enumerate(reasons) if r]
        if dup:
            _drop_rows(pool, stage, sid, uids, dup, reasons)
    atomic_write_bytes(stamp, b"")


def _drop_rows(pool: Pool, stage: str, sid: str, uids: list, dup: list[int], reasons: list):
    """Turn rows `dup` of one shard's output into error rows (each once), embeddings then table."""
    import pyarrow.parquet as pq

    table = pool.read_columns(stage, sid)
    keep = np.setdiff1d(np.arange(len(uids)), dup)
    keys = table.column("key").to_pylist()
    err_path = pool.error_path(stage, sid)
    old = pq.read_table(err_path).to_pylist() if err_path.exists() else []
    seen = {(r["uid"], r["reason"]) for r in old}
    new = [{"uid": uids[i], "key": keys[i], "reason": reasons[i]} for i in dup]
    new = [r for r in new if (r["uid"], r["reason"]) not in seen]
    if new:
        write_errors(err_path, stage, sid, old + new)
    for p in (pool.root / "embeddings" / stage).glob(f"{sid}.*.npy"):
        arr = np.load(p, mmap_mode="r")
        if len(arr) == len(uids):  # not trimmed yet
            atomic_save_npy(p, np.asarray(arr[keep]))
    atomic_write_table(pool.column_path(stage, sid), table.take(keep))


__all__ = [
    "StageConflict",
    "ShardResult",
    "StageSummary",
    "bind_params",
    "claim_stage",
    "select_shards",
    "shards_to_do",
    "prepare_stage",
    "stage_counts",
    "finish_stage",
    "move_cross_shard_duplicates",
]
