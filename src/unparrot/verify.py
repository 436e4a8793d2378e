"""`unparrot verify POOL`: check a pool's integrity without recomputing anything.

It reads the shards (uids and keys of every sample, in order) and every stage's files, and reports each
file that does not add up:

- a stage's column file against its shard: every row is a sample of that shard, in shard order, no uid
  twice; rows + error rows = the shard's samples (stages with error files; `cluster` rows = its input
  stage's rows); a shard with no output (an incomplete stage) or changed since it was processed;
- embeddings (`embeddings/<stage>/<shard>.<name>.npy`) with exactly one row per column-file row;
- `_stage.json` present and readable, one schema across a stage's column files, cluster labels < k and
  the centroids in `cluster/<stage>/` of that k;
- subsets: a readable DataComp array whose uids are all in the pool, with its `.json` and the same count;
- a reshard output: as many samples as its `reshard.json` says were written;
- no stray temporary files (`.*.tmp`), stage folders being built aside, or an unfinished reshard.

It is what the crash-resume tests run after every rerun: a pool that passes holds no half-written file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from .pool import SOURCE_KEY, Pool, read_subset, source_stamp, subset_contains, u8_to_uids, uids_to_u8


@dataclass
class VerifyReport:
    pool: str
    shards: int = 0
    samples: int = 0
    stages: dict = field(default_factory=dict)  # stage -> {"shards", "rows", "errors"}
    subsets: int = 0
    problems: list = field(default_factory=list)  # (path, message)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, path, message: str):
        self.problems.append((str(path), message))

    def line(self) -> str:
        head = (
            f"verify {self.pool}: {self.shards} shards, {self.samples} samples, {len(self.stages)} stages, "
            f"{self.subsets} subsets: " + ("ok" if self.ok else f"{len(self.problems)} problem(s)")
        )
        lines = [head]
        for st, c in sorted(self.stages.items()):
            lines.append(f"  {st:<16} {c['shards']} shards, {c['rows']} rows, {c['errors']} errors")
        lines += [f"  PROBLEM {path}: {msg}" for path, msg in self.problems]
        return "\n".join(lines)


def _is_subsequence(part: list, whole: list) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def verify(pool: Pool | str) -> VerifyReport:
    """Check every file of `pool` against the others; see the module docstring. Never raises for a bad
    file: each one is a problem in the report."""
    import pyarrow.parquet as pq

    pool = pool if isinstance(pool, Pool) else Pool(pool)
    rep = VerifyReport(str(pool.root))
    shards = pool.shards()
    rep.shards = len(shards)
    samples: dict[str, list[tuple[str, str]]] = {}
    for sh in shards:
        try:
            samples[sh.id] = [(r["uid"], r["key"]) for r in pool.samples([sh])]  # a tar break is no sample
        except OSError as e:
            rep.add(sh.path, f"cannot read the shard: {e}")
            samples[sh.id] = []
    rep.samples = sum(len(v) for v in samples.values())
    if shards:
        pool_uids = uids_to_u8(u for v in samples.values() for u, _ in v)
    else:  # a pool of columns only: its stages' uids are the pool
        stages = [st for st in pool.stages() if pool.done_shards(st)]
        pool_uids = uids_to_u8(u for st in stages for u in pool.load(st, columns=[])["uid"])

    for st in pool.stages():
        _verify_stage(pool, st, shards, samples, rep, pq)
    _verify_subsets(pool, pool_uids, rep)
    rec = pool.root / "reshard.json"
    if rec.exists():
        try:
            written = int(json.loads(rec.read_text())["written"])
            if written != rep.samples:
                rep.add(rec, f"records {written} samples written, the shards hold {rep.samples}")
        except (ValueError, KeyError, TypeError) as e:
            rep.add(rec, f"unreadable completion record: {e}")
    for p in sorted(pool.root.rglob("*")):
        if (
            p.name.endswith(".tmp")
            or p.name == ".reshard.partial"
            or (
                p.parent.name in ("columns", "cluster") and p.name.startswith(".") and p.name.endswith((".new", ".old"))
            )
        ):
            rep.add(p, "left by an interrupted write (rerun the command that makes it)")
    return rep


def _verify_stage(pool: Pool, st: str, shards, samples, rep: VerifyReport, pq):
    d = pool.root / "columns" / st
    done = pool.done_shards(st)
    counts = rep.stages.setdefault(st, {"shards": len(done), "rows": 0, "errors": 0})
    info = None
    if done:
        try:
            info = pool.stage_info(st)
            if info is None:
                rep.add(d / "_stage.json", "missing: the stage's operator and parameters are unknown")
            elif not isinstance(info, dict) or "op" not in info:
                rep.add(d / "_stage.json", "has no `op`")
                info = None
        except ValueError as e:
            rep.add(d / "_stage.json", f"unreadable: {e}")
    by_id = {s.id: s for s in shards}
    # without shards (a pool of columns only) every stage should cover the shards some stage has
    ids = list(by_id) or sorted({sid for other in pool.stages() for sid in pool.done_shards(other)})
    missing = [sid for sid in ids if sid not in set(done)]
    if done and missing:
        rep.add(d, f"incomplete: no output for {len(missing)} of {len(ids)} shards (e.g. {missing[0]})")
    has_errors = (pool.root / "errors" / st).exists()
    params = (info or {}).get("params", {}) if isinstance(info, dict) else {}
    base = params.get("embed_stage") if (info or {}).get("op") == "cluster" else None
    schema, seen = None, {}
    for sid in done:
        path = pool.column_path(st, sid)
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a problem to report
            rep.add(path, f"unreadable column file: {type(e).__name__}: {e}")
            continue
        names = table.schema.names
        if schema is None:
            schema = names
        elif names != schema:
            rep.add(path, f"columns {names} differ from the stage's other files {schema}")
        if "uid" not in names:
            rep.add(path, "no uid column")
            continue
        uids = table.column("uid").to_pylist()
        keys = table.column("key").to_pylist() if "key" in names else [None] * len(uids)
        counts["rows"] += len(uids)
        for u in uids:
            if u in seen:
                rep.add(path, f"uid {u} also in shard {seen[u]}")
                break
            seen[u] = sid
        if sid not in by_id:
            if shards:
                rep.add(path, f"output for a shard the pool does not have ({sid})")
            _verify_embeddings(pool, st, sid, len(uids), rep)
            continue
        shard_rows = samples[sid]
        if not _is_subsequence(
            list(zip(uids, keys)) if "key" in names else uids,
            shard_rows if "key" in names else [u for u, _ in shard_rows],
        ):
            rep.add(path, "rows are not the shard's samples in shard order")
        stamp = (table.schema.metadata or {}).get(SOURCE_KEY)
        try:
            if stamp is not None and stamp.decode() != source_stamp(by_id[sid].path):
                rep.add(path, f"the shard {by_id[sid].path} changed after this output was made: rerun the stage")
        except OSError:
            pass
        if has_errors:
            epath = pool.error_path(st, sid)
            if not epath.exists():
                rep.add(epath, "missing (written with every column file)")
            else:
                try:
                    err = pq.read_table(epath, columns=["uid", "key"]).to_pydict()
                except Exception as e:  # noqa: BLE001
                    rep.add(epath, f"unreadable error file: {type(e).__name__}: {e}")
                    err = None
                if err is not None:
                    ekeys = [k for u, k in zip(err["uid"], err["key"]) if u is not None]
                    counts["errors"] += len(ekeys)
                    if sorted(map(str, keys + ekeys)) != sorted(str(k) for _, k in shard_rows):
                        rep.add(
                            path,
                            f"{len(uids)} rows + {len(ekeys)} error rows do not account for the shard's "
                            f"{len(shard_rows)} samples",
                        )
        elif base is not None and pool.column_path(base, sid).exists():
            want = pq.read_table(pool.column_path(base, sid), columns=["uid"]).column("uid").to_pylist()
            if want != uids:
                rep.add(path, f"rows differ from those of its input stage {base!r}")
        if base is not None and "cluster" in names and "k" in params:
            labels = np.asarray(table.column("cluster").to_numpy(zero_copy_only=False))
            if len(labels) and (labels.min() < 0 or labels.max() >= int(params["k"])):
                rep.add(path, f"cluster labels outside 0..{int(params['k']) - 1} (_stage.json says k={params['k']})")
        _verify_embeddings(pool, st, sid, len(uids), rep)
    if done and base is not None and "k" in params:
        _verify_cluster_model(pool, st, int(params["k"]), rep)


def _verify_cluster_model(pool: Pool, st: str, k: int, rep: VerifyReport):
    """POOL/cluster/<stage> must hold the centroids of the stage's k: `--centroids` assigns with them."""
    path = pool.root / "cluster" / st / "centroids.npy"
    try:
        got = len(np.load(path, mmap_mode="r"))
    except (OSError, ValueError) as e:
        rep.add(path, f"the stage's centroids are unreadable or missing (rerun cluster): {e}")
        return
    if got != k:
        rep.add(path, f"{got} centroids beside a stage of k={k} (rerun cluster)")


def _verify_embeddings(pool: Pool, st: str, sid: str, rows: int, rep: VerifyReport):
    for emb in sorted((pool.root / "embeddings" / st).glob(f"{sid}.*.npy")):
        try:
            n = len(np.load(emb, mmap_mode="r"))
        except Exception as e:  # noqa: BLE001
            rep.add(emb, f"unreadable embeddings: {type(e).__name__}: {e}")
            continue
        if n != rows:
            rep.add(emb, f"{n} rows for the column file's {rows}")


def _verify_subsets(pool: Pool, pool_uids: np.ndarray, rep: VerifyReport):
    d = pool.root / "subsets"
    for p in sorted(d.glob("*.npy")) if d.exists() else []:
        rep.subsets += 1
        try:
            arr = read_subset(p)
        except Exception as e:  # noqa: BLE001
            rep.add(p, f"not a DataComp subset: {e}")
            continue
        if len(arr):
            if len(pool_uids):
                absent = int((~subset_contains(pool_uids, u8_to_uids(arr))).sum())
            else:
                absent = len(arr)
            if absent:
                rep.add(p, f"{absent} of {len(arr)} uids are not in the pool")
        stats = p.with_suffix(".json")
        if not stats.exists():
            if any(pool.root.glob("columns/*/_stage.json")):  # written by select (a pool with stages)
                rep.add(stats, "missing: the subset has no funnel (an interrupted select?)")
            continue
        try:
            kept = json.loads(stats.read_text()).get("kept")
        except ValueError as e:
            rep.add(stats, f"unreadable: {e}")
            continue
        if kept is not None and int(kept) != len(arr):
            rep.add(stats, f"says {kept} kept, {p.name} holds {len(arr)}")


__all__ = ["verify", "VerifyReport"]
