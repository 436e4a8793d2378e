"""A pool is a folder: shards (in place or under `shards/`), per-stage columns, embeddings, errors, subsets.

```
POOL/pool.yaml                          optional: where the shards are, when they live elsewhere
POOL/shards/*.tar                       default shard location (written by `ingest` and `synth`)
POOL/columns/<stage>/<shard>.parquet    one row per processed sample, keyed by `uid`
POOL/columns/<stage>/_stage.json        the operator and parameters that produced the stage
POOL/embeddings/<stage>/<shard>.<name>.npy   float16 rows aligned with the parquet file's rows
POOL/errors/<stage>/<shard>.parquet     uid, key, shard, stage, reason of each sample that failed
POOL/subsets/<name>.npy                 DataComp subset: sorted uids as dtype (u8, u8)
```

A shard's column file is written last and atomically, so its presence means the shard is done.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ERROR_COLUMNS = ("uid", "key", "shard", "stage", "reason")
SUBSET_DTYPE = np.dtype("u8,u8")
_UMASK = os.umask(0)
os.umask(_UMASK)


def _tmp_beside(path: Path) -> tuple[int, str]:
    """A temporary file next to `path` (same filesystem, so os.replace is atomic), with normal permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)
    return fd, tmp


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset/DataComp shard patterns: "a/{000..003}.tar", "{x,y}.tar"."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end() :], m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for it in items for p in expand_braces(head + it + tail)]


@contextmanager
def _atomic(path: Path):
    """Yield a temporary path beside `path`; rename it into place on success, remove it on failure."""
    fd, tmp = _tmp_beside(Path(path))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temp(*folders: Path) -> int:
    """Remove the temporary files (`.<name>.<random>.tmp`, see _tmp_beside) that a killed writer left in
    `folders` (recursively), so a rerun ends with exactly the files of an uninterrupted run. Only for
    folders no other running process writes to. Returns how many were removed."""
    n = 0
    for d in folders:
        if Path(d).is_dir():
            for p in Path(d).rglob(".*.tmp"):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    n += 1
    return n


def atomic_write_bytes(path: Path, data: bytes):
    with _atomic(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_table(path: Path, table: pa.Table):
    with _atomic(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def atomic_save_npy(path: Path, arr: np.ndarray):
    with _atomic(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


@contextmanager
def stage_aside(root: Path, stage: str):
    """Build a whole-pool stage's column folder aside and swap it in only once it is complete.

    Yields `columns/.<stage>.new`; on success the old `columns/<stage>` (if any) is renamed away, the new
    folder renamed into its place and the old one removed. A killed run leaves either the old stage or
    none (never a mix of shards from two runs, nor a part of one); its leftovers are removed by the next run."""
    cols = Path(root) / "columns"
    new, old, cur = cols / f".{stage}.new", cols / f".{stage}.old", cols / stage
    for d in (new, old):
        shutil.rmtree(d, ignore_errors=True)
    new.mkdir(parents=True)
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if cur.exists():
        os.replace(cur, old)
    os.replace(new, cur)
    shutil.rmtree(old, ignore_errors=True)


SOURCE_KEY = b"unparrot.source"  # column-file metadata: the stat of the shard it was made from


def source_stamp(path: str | os.PathLike) -> str:
    """Size and mtime (ns) of a shard file: cheap, and changed by any repair or replacement of the file."""
    st = os.stat(path)
    return json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns})


# in columns/<stage>/: the engines' cross-shard duplicate check has gone over every shard written so far
CROSS_SHARD_STAMP = "_cross_shard_dups.done"


class FirstSeen:
    """Where each uid of a stage was first kept: the one duplicate-uid rule of the code base.

    A uid names one sample (DataComp's convention, and the key every stage joins on), so a second sample
    with it is an error row, never a second row: within a shard (`Pool.rows`), across the shards of one
    read (`rewrite`), and across a stage's finished shards (`engine.stage.move_cross_shard_duplicates`)."""

    def __init__(self):
        self.first: dict[str, tuple[str, str | None]] = {}

    def duplicate(self, uid: str, shard: str) -> str | None:
        """The error reason for a sample of `shard` with `uid` when that uid was kept before, else None."""
        if uid not in self.first:
            return None
        sid, key = self.first[uid]
        return f"duplicate uid {uid} (first {f'at key {key} of this shard' if sid == shard else f'in shard {sid}'})"

    def keep(self, uid: str, shard: str, key: str | None = None):
        """Record a kept sample (the first keeping of a uid wins)."""
        self.first.setdefault(uid, (shard, key))


@dataclass(frozen=True)
class Shard:
    """A shard: its id (used to name its column files) and the tar path."""

    id: str
    path: str


class Pool:
    """A pool folder. Cheap to construct; nothing is read until asked."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"pool folder {str(self.root)!r} does not exist")

    # ---- shards -------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        p = self.root / "pool.yaml"
        if not p.exists():
            return {}
        cfg = yaml.safe_load(p.read_text()) or {}
        if not isinstance(cfg, dict):
            raise ValueError(f"{p}: expected a mapping, got {type(cfg).__name__}")
        return cfg

    def shards(self) -> list[Shard]:
        """All shards, sorted by id. Shard ids are paths relative to their source folder, without .tar."""
        sources = self.config.get("shards")
        if sources is None:
            sources = ["shards"]
        if isinstance(sources, str):
            sources = [sources]
        out: dict[str, str] = {}
        for src in sources:
            src = str(src)
            if not os.path.isabs(src):  # relative to the pool folder
                src = str(self.root / src)
            for path, sid in list_source(src):
                if sid in out and out[sid] != path:
                    raise ValueError(f"two shards share the id {sid!r}: {out[sid]} and {path}")
                out[sid] = path
        return [Shard(k, out[k]) for k in sorted(out)]

    # ---- columns ------------------------------------------------------------------------------
    def column_path(self, stage: str, shard: str) -> Path:
        return self.root / "columns" / stage / f"{shard}.parquet"

    def error_path(self, stage: str, shard: str) -> Path:
        return self.root / "errors" / stage / f"{shard}.parquet"

    def embedding_path(self, stage: str, shard: str, name: str) -> Path:
        return self.root / "embeddings" / stage / f"{shard}.{name}.npy"

    def stages(self) -> list[str]:
        d = self.root / "columns"
        # (dot-folders are stages being built aside, see stage_aside)
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")) if d.exists() else []

    def stage_info(self, stage: str) -> dict | None:
        p = self.root / "columns" / stage / "_stage.json"
        return json.loads(p.read_text()) if p.exists() else None

    def done_shards(self, stage: str) -> list[str]:
        d = self.root / "columns" / stage
        if not d.exists():
            return []
        return sorted(str(p.relative_to(d))[: -len(".parquet")] for p in d.rglob("*.parquet"))

    def write_columns(
        self,
        stage: str,
        shard: str,
        columns: dict,
        errors: Sequence[dict] = (),
        schema: dict | None = None,
        embedding_dims: dict | None = None,
        source: str | None = None,
        stamp: str | None = None,
    ):
        """Write one shard's output: errors, then embeddings, then the column file (the 'done' marker).

        2-D float arrays among `columns` are embeddings: saved as float16 .npy aligned with the rows.
        `schema` (column -> arrow type) and `embedding_dims` (embedding -> width) are what the stage writes:
        a shard where no sample could be processed (an empty or corrupt tar, routine in img2dataset output)
        still gets every column, typed, and 0-row embeddings, so later stages and `select` find them.
        New output makes the stage's cross-shard duplicate check due again (its stamp is removed first).
        `source` (the shard's tar) has its size and mtime recorded in the column file, so a shard repaired
        or replaced later is processed again (see `changed_shards`); `stamp` is that record taken when the
        shard was opened (then a shard replaced while it was processed is redone as well)."""
        (self.root / "columns" / stage / CROSS_SHARD_STAMP).unlink(missing_ok=True)
        write_errors(self.error_path(stage, shard), stage, shard, errors)
        n = len(columns["uid"]) if "uid" in columns else 0
        columns = dict(columns)
        for name, width in (embedding_dims or {}).items():
            if name not in columns and n == 0:
                columns[name] = np.zeros((0, int(width)), np.float16)
        table_cols = {}
        for name, values in columns.items():
            if isinstance(values, np.ndarray) and values.ndim == 2 and values.dtype.kind == "f":
                atomic_save_npy(self.embedding_path(stage, shard, name), values.astype(np.float16))
            else:
                table_cols[name] = values
        types = {"uid": pa.string(), "key": pa.string(), **(schema or {})}
        table = to_arrow(table_cols, types)
        if stamp is not None or source is not None:
            rec = stamp if stamp is not None else source_stamp(source)
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), SOURCE_KEY: rec})
        atomic_write_table(self.column_path(stage, shard), table)

    def stage_schema(self, stage: str) -> pa.Schema | None:
        """The column schema of a stage: that of its first shard with rows (a 0-row file written by an
        operator that declares no schema may lack columns), else of its first shard; None without output."""
        done = self.done_shards(stage)
        for sid in done:
            meta = pq.read_metadata(self.column_path(stage, sid))
            if meta.num_rows:
                return meta.schema.to_arrow_schema()
        return pq.read_schema(self.column_path(stage, done[0])) if done else None

    def changed_shards(self, stage: str, shards: Iterable[Shard]) -> list[str]:
        """Ids of the done `shards` whose tar is no longer the one the stage's output was made from (its size
        or mtime differ from the record in the column file; output without a record counts as current)."""
        out = []
        for sh in shards:
            p = self.column_path(stage, sh.id)
            if not p.exists():
                continue
            rec = (pq.read_schema(p).metadata or {}).get(SOURCE_KEY)
            try:
                if rec is not None and rec.decode() != source_stamp(sh.path):
                    out.append(sh.id)
            except OSError:  # the shard is gone: its output stays, the engines report the missing shard
                pass
        return out

    def read_columns(self, stage: str, shard: str, columns: Sequence[str] | None = None) -> pa.Table:
        """One shard's columns. A 0-row file that lacks some of them (an empty shard's output from an
        operator that declares no schema) gives the ones it has: there are no values to miss."""
        path = self.column_path(stage, shard)
        if columns:
            meta = pq.read_metadata(path)
            if meta.num_rows == 0:
                names = set(meta.schema.to_arrow_schema().names)
                columns = [c for c in columns if c in names]
        return pq.read_table(path, columns=list(columns) if columns else None)

    def load(
        self,
        stages: str | Sequence[str],
        columns: Sequence[str] | None = None,
        shards: Iterable[str] | None = None,
        how: str = "outer",
    ):
        """Load columns of one or more stages as a pandas DataFrame, joined by uid.

        `columns` limits what is read (uid is always included). Rows keep the first stage's order;
        stages that failed on a row leave NaN/None there (how="outer") or drop it (how="inner").
        """
        import pandas as pd

        stages = [stages] if isinstance(stages, str) else list(stages)
        frames = []
        for stage in stages:
            done = self.done_shards(stage)
            if not done:
                raise FileNotFoundError(f"stage {stage!r} has no output in {self.root} (run it first)")
            want = done if shards is None else [s for s in shards if s in set(done)]
            cols = None
            if columns is not None:
                schema = self.stage_schema(stage)
                cols = ["uid"] + [c for c in columns if c in schema.names and c != "uid"]
            parts = [self.read_columns(stage, s, cols).to_pandas() for s in want]
            df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"uid": []})
            if "shard" not in df.columns and stage == stages[0]:
                df.insert(1, "shard", np.repeat(want, [len(p) for p in parts]) if parts else [])
            frames.append(df)
        out = frames[0]
        for df in frames[1:]:
            dup = [c for c in df.columns if c in out.columns and c != "uid"]
            out = out.merge(df.drop(columns=dup), on="uid", how="left" if how == "outer" else "inner")
        if columns is not None:
            missing = [c for c in columns if c not in out.columns]
            if missing:
                raise KeyError(f"columns {missing} are in none of the stages {stages}")
        return out

    def embeddings(self, stage: str, name: str, shards: Iterable[str] | None = None, mmap: bool = True):
        """Return (uids, list of per-shard float16 arrays), memory-mapped unless `mmap=False`."""
        done = self.done_shards(stage)
        want = done if shards is None else [s for s in shards if s in set(done)]
        uids, arrays = [], []
        for s in want:
            p = self.embedding_path(stage, s, name)
            if not p.exists():
                raise FileNotFoundError(f"no {name!r} embeddings for shard {s} of stage {stage!r}")
            arr = np.load(p, mmap_mode="r" if mmap else None)
            u = self.read_columns(stage, s, ["uid"]).column("uid").to_pylist()
            if len(u) != len(arr):
                raise ValueError(f"{p}: {len(arr)} rows but {len(u)} uids")
            uids.extend(u)
            arrays.append(arr)
        return uids, arrays

    def errors(self, stage: str):
        import pandas as pd

        d = self.root / "errors" / stage
        parts = [pq.read_table(p).to_pandas() for p in sorted(d.rglob("*.parquet"))] if d.exists() else []
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(ERROR_COLUMNS))

    # ---- sample rows --------------------------------------------------------------------------
    def samples(self, shards: Sequence[Shard] | None = None) -> Iterator[dict]:
        """Every parsed sample row of the pool (or of `shards`), in shard order. Shard problems are skipped
        silently: this is for reading a pool (tests, statistics, reports), not for a stage, which must
        account for every sample (see `rows`)."""
        from .io.samples import parse_sample
        from .io.tar import ShardProblem, iter_samples

        for sh in shards if shards is not None else self.shards():
            for item in iter_samples(sh.path):
                if not isinstance(item, ShardProblem):
                    yield parse_sample(item, sh.id)

    def inputs(self, stage: str, shard: str, columns: Sequence[str]) -> dict:
        """Columns of an earlier stage for one shard, with its `uid`s; a name that is not a parquet column is
        read from the stage's embeddings (`embeddings/<stage>/<shard>.<name>.npy`, rows aligned with the
        parquet). A shard the stage has no file for gives no rows (its samples then lack that input)."""
        if not self.column_path(stage, shard).exists():
            return {"uid": [], **{c: [] for c in columns if c != "uid"}}
        names = set(pq.read_schema(self.column_path(stage, shard)).names)
        out = self.read_columns(stage, shard, ["uid"] + [c for c in columns if c in names and c != "uid"]).to_pydict()
        for c in columns:
            if c not in names:
                p = self.embedding_path(stage, shard, c)
                if not p.exists():
                    if not out["uid"]:  # a 0-row file from an operator that declares no schema: nothing to read
                        out[c] = []
                        continue
                    raise KeyError(f"stage {stage!r} has no column or embedding {c!r} (shard {shard})")
                out[c] = np.load(p)
        return out

    def rows(
        self,
        shard: Shard,
        inputs: dict | None = None,
        needs: Sequence[str] = (),
        *,
        check: Callable[[dict], str | None] | None = None,
        seen: FirstSeen | None = None,
    ) -> Iterator[tuple]:
        """Every sample of a shard as (row, reason, problem), for a stage that must account for each one.

        `row` is the parsed sample with the columns of the input stages (`inputs`: {stage: [columns]})
        merged in; `reason` says why it cannot be processed (None when it can); `problem` is set for a tar
        broken between samples (row None) or inside this sample. The reasons, in order: the sample's own
        problem or one of a field it `needs`; no output of an input stage; `check(row)` (a stage's own
        refusal, which may normalise the row in place); a uid already kept (`seen`: per shard by default,
        shared across shards when given). Both engines and `rewrite` read shards through this."""
        from .io.samples import parse_sample
        from .io.tar import ShardProblem, iter_samples

        cols = {st: self.inputs(st, shard.id, c) for st, c in (inputs or {}).items()}
        index = {st: {u: i for i, u in enumerate(c["uid"])} for st, c in cols.items()}
        seen = FirstSeen() if seen is None else seen
        for item in iter_samples(shard.path):
            if isinstance(item, ShardProblem):
                yield None, item.reason, item
                continue
            row = parse_sample(item, shard.id)
            probs = row["problems"]
            reason = probs.get("sample") or next((probs[f] for f in needs if f in probs), None)
            missing = [st for st in cols if row["uid"] not in index[st]]
            if reason is None and missing:
                reason = f"no {missing[0]!r} output for this sample (see errors/{missing[0]})"
            if reason is None:
                for st, c in cols.items():
                    i = index[st][row["uid"]]
                    row.update({k: v[i] for k, v in c.items() if k != "uid"})
                reason = (check(row) if check else None) or seen.duplicate(row["uid"], shard.id)
            if reason is None:
                seen.keep(row["uid"], shard.id, row["key"])
            yield row, reason, item if item.broke_shard else None

    # ---- subsets ------------------------------------------------------------------------------
    def subset_path(self, name: str) -> Path:
        return self.root / "subsets" / f"{name}.npy"


def list_source(src: str) -> list[tuple[str, str]]:
    """(path, id) of the tars a source names: a folder (searched recursively), a glob or a brace pattern.
    A relative source is relative to the current directory (a pool's sources: to the pool folder)."""
    if os.path.isdir(src):
        paths = sorted(glob.glob(os.path.join(src, "**", "*.tar"), recursive=True))
        return [(p, os.path.relpath(p, src)[:-4]) for p in paths]
    paths = []
    for pat in expand_braces(src):
        paths.extend(sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat])
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"shards not found: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return [(p, Path(p).name[:-4] if p.endswith(".tar") else Path(p).name) for p in paths]


def to_arrow(columns: dict, types: dict | None = None) -> pa.Table:
    """Build an arrow table from a dict of equal-length columns (lists or 1-D arrays).

    `types` (column -> arrow type) types the columns whose values say nothing (none, or all None), casts
    the others to it where arrow can do so safely (the Ray engine hands back float32 scores as Python
    floats), and adds the named columns that are absent as nulls."""
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns have different lengths: {lengths}")
    n = next(iter(lengths.values()), 0)
    types = types or {}
    arrays = {}
    for k, v in columns.items():
        arr = pa.array(v) if isinstance(v, np.ndarray) and v.ndim == 1 else pa.array(list(v))
        if k in types and arr.type != types[k]:
            if pa.types.is_null(arr.type):
                arr = pa.nulls(len(arr), types[k])
            else:
                try:
                    arr = arr.cast(types[k])
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    pass  # keep what the values say
        arrays[k] = arr
    for k, t in types.items():
        if k not in arrays:
            arrays[k] = pa.nulls(n, t)
    return pa.table(arrays)


def write_errors(path: Path, stage: str, shard: str, errors: Sequence[dict]):
    rows = {c: [] for c in ERROR_COLUMNS}
    for e in errors:
        for c in ERROR_COLUMNS:
            rows[c].append(e.get(c, stage if c == "stage" else shard if c == "shard" else None))
    schema = pa.schema([(c, pa.string()) for c in ERROR_COLUMNS])
    atomic_write_table(path, pa.table({c: pa.array(rows[c], pa.string()) for c in ERROR_COLUMNS}, schema=schema))


# ---- DataComp subsets ---------------------------------------------------------------------------
def uids_to_u8(uids: Iterable[str]) -> np.ndarray:
    """Hex uids -> sorted, unique array of (u8, u8), DataComp's subset format."""
    # np.unique sorts by (f0, f1): the order DataComp's resharder binary-searches
    return np.unique(uids_to_array(list(uids)))


def u8_to_uids(arr: np.ndarray) -> list[str]:
    return [f"{int(a):016x}{int(b):016x}" for a, b in zip(arr["f0"], arr["f1"])]


def write_subset(path: str | os.PathLike, uids: Iterable[str]) -> np.ndarray:
    arr = uids_to_u8(uids)
    atomic_save_npy(Path(path), arr)
    return arr


def read_subset(path: str | os.PathLike) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    if arr.dtype != SUBSET_DTYPE:
        if arr.dtype.names and len(arr.dtype.names) == 2 and all(arr.dtype[i] == np.uint64 for i in range(2)):
            arr = arr.view(SUBSET_DTYPE)
        else:
            raise ValueError(f"{path}: a subset must be a numpy array of dtype (u8, u8), got {arr.dtype}")
    hi, lo = arr["f0"], arr["f1"]
    if len(arr) > 1 and not np.all((hi[:-1] < hi[1:]) | ((hi[:-1] == hi[1:]) & (lo[:-1] <= lo[1:]))):
        arr = np.sort(arr)  # DataComp requires sorted subsets; accept and fix unsorted ones
    return arr


def subset_contains(subset: np.ndarray, uids: Sequence[str]) -> np.ndarray:
    """Vectorised membership test of hex uids in a sorted subset array."""
    if len(uids) == 0:
        return np.zeros(0, bool)
    q = uids_to_array(uids)
    if len(subset) == 0:
        return np.zeros(len(q), bool)
    idx = np.minimum(np.searchsorted(subset, q), len(subset) - 1)
    return subset[idx] == q


def uids_to_array(uids: Sequence[str]) -> np.ndarray:
    """Hex uids -> (u8, u8) array in the given order (no sorting, duplicates kept)."""
    bad = next((u for u in uids if not isinstance(u, str) or len(u) != 32), None)
    if bad is not None:
        raise ValueError(f"uid {bad!r} is not 32 hex digits")
    return np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], dtype=SUBSET_DTYPE)
