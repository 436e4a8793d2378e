"""The cluster engine: the same operators through Ray Data (`--engine ray`), for pools beyond one machine.

Shards are read by Ray tasks (one shard per task, the same parsing and checks as the local engine), the
operator runs in an actor pool through `map_batches` (loaded once per actor; `num_gpus` per actor on a
GPU cluster), and each shard's rows are grouped back and written with the pool's atomic per-shard files,
so the output is identical to the local engine's and finished shards are skipped on a rerun.
Connect to a running cluster with `address="auto"` (or `ray://...`); by default a local Ray starts.
"""

from __future__ import annotations

import json
import time

import numpy as np

from ..ops import get_op
from ..pool import Pool, Shard
from .local import StageSummary, _move_cross_shard_duplicates, prepare_stage, shard_rows, stage_counts

_FIELDS = ("uid", "key", "shard", "image", "image_ext", "caption")


def _read_shard(item, root: str, inputs_spec: dict, needs: tuple):
    """flat_map task: one shard -> its sample rows (the local engine's checks; `_reason`, `_pos` added)."""
    pool = Pool(root)
    shard = Shard(item["shard"], item["path"])
    for pos, (row, reason, problem) in enumerate(shard_rows(pool, shard, needs, inputs_spec)):
        if row is None:
            yield {
                "_pos": pos,
                "shard": shard.id,
                "uid": None,
                "key": problem.after_key,
                "image": b"",
                "image_ext": "",
                "caption": "",
                "meta": "{}",
                "_reason": reason,
                "_sample": False,
                "_has_caption": False,
            }
            continue
        out = {k: row[k] if row[k] is not None else ("" if k != "image" else b"") for k in _FIELDS}
        out.update(
            {
                "_pos": pos,
                "meta": json.dumps(row["meta"]),
                "_reason": reason or "",
                "_sample": True,
                "_has_caption": row["caption"] is not None,
            }
        )
        for cols in inputs_spec.values():
            for c in cols:
                if c != "uid":
                    out[c] = row.get(c)
        yield out


class _RunOp:
    """map_batches actor: the operator, loaded once, applied to the rows that have no read error."""

    def __init__(self, op: str, params: dict):
        self.op = get_op(op)(**params)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["_pos"])
        # Arrow turns None into NaN in numpy batches: no error is "" end to end
        reasons = [r if isinstance(r, str) else "" for r in batch["_reason"]]
        ok = [i for i in range(n) if not reasons[i]]
        result: dict = {
            "_pos": batch["_pos"],
            "shard": batch["shard"],
            "uid": batch["uid"],
            "key": batch["key"],
            "_sample": batch["_sample"],
        }
        errors = list(reasons)
        if ok:
            sub = {k: [batch[k][i] for i in ok] for k in batch if not k.startswith("_")}
            sub["meta"] = [json.loads(m) for m in sub["meta"]]
            sub["caption"] = [c if h else None for c, h in zip(sub["caption"], [batch["_has_caption"][i] for i in ok])]
            out = self.op(sub)
            for i, e in zip(ok, out.get("error") or [None] * len(ok)):
                errors[i] = str(e) if e else ""
            for k, v in out.items():
                if k == "error":
                    continue
                if isinstance(v, np.ndarray) and v.ndim == 2:
                    full = np.zeros((n, v.shape[1]), v.dtype)
                    full[ok] = v
                else:
                    full = np.empty(n, dtype=object)
                    for j, i in enumerate(ok):
                        full[i] = v[j]
                result[k] = full
        result["_error"] = np.array(errors, dtype=object)
        return result


def _writer(root: str, stage: str, paths: dict | None = None):
    """`paths` (shard id -> tar) lets each column file record its tar's size and mtime, as the local
    engine's do, so a shard repaired later is processed again."""
    paths = paths or {}

    def write(group: dict) -> dict:
        pool = Pool(root)
        order = np.argsort(np.asarray(group["_pos"]))
        sid = str(group["shard"][0])
        errors, keep = [], []
        for i in order:
            e = group["_error"][i]
            if isinstance(e, str) and e:
                uid = group["uid"][i] if group["_sample"][i] else None
                errors.append({"uid": uid, "key": group["key"][i], "reason": str(e)})
            else:
                keep.append(i)
        cols = {"uid": [group["uid"][i] for i in keep], "key": [group["key"][i] for i in keep]}
        for k, v in group.items():
            if k.startswith("_") or k in ("uid", "key", "shard"):
                continue
            v = np.asarray(v) if not isinstance(v, np.ndarray) else v
            if v.ndim == 2 and v.dtype.kind == "f":
                cols[k] = v[keep]
            else:
                cols[k] = [_plain(v[i]) for i in keep]
        pool.write_columns(stage, sid, cols, errors, source=paths.get(sid))
        return {"shard": np.array([sid]), "rows": np.array([len(keep)])}

    return write


def _plain(v):
    """Ray hands back numpy scalars and arrays; parquet wants plain Python values."""
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()] if v.dtype == object else v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def run_stage_ray(
    pool: Pool | str,
    op: str,
    params: dict | None = None,
    *,
    stage: str | None = None,
    workers: int = 2,
    batch_size: int = 64,
    shards: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
    address: str | None = None,
    num_gpus: float = 0.0,
) -> StageSummary:
    """`run_stage` on Ray Data: `workers` operator actors (each `num_gpus`), the same files and counts."""
    import ray

    pool = pool if isinstance(pool, Pool) else Pool(pool)
    params = dict(params or {})
    stage = stage or op
    t0 = time.time()
    op_cls, all_shards, todo = prepare_stage(pool, op, params, stage, shards, overwrite)
    inputs = op_cls.inputs_for(params)
    if todo:
        # locally, logical CPUs for the operator actors plus the read and write tasks (else they starve)
        ray.init(
            address=address,
            ignore_reinit_error=True,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            **({} if address else {"num_cpus": max(workers, 1) + 2}),
        )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        items = ray.data.from_items([{"shard": s.id, "path": s.path} for s in todo], override_num_blocks=len(todo))
        rows = items.flat_map(
            _read_shard, fn_kwargs={"root": str(pool.root), "inputs_spec": inputs, "needs": tuple(op_cls.needs)}
        )
        out = rows.map_batches(
            _RunOp,
            fn_constructor_kwargs={"op": op, "params": params},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_gpus=num_gpus or None,
            batch_format="numpy",
        )
        write = _writer(str(pool.root), stage, {s.id: s.path for s in todo})
        out.groupby("shard").map_groups(write, batch_format="numpy").materialize()
    _move_cross_shard_duplicates(pool, stage)
    counts = stage_counts(pool, stage, [s.id for s in all_shards])
    errs = pool.errors(stage)
    problems = [
        f"shard {sh}: {r}" for sh, r, u in zip(errs["shard"], errs["reason"], errs["uid"]) if u is None or u != u
    ]
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
    )
