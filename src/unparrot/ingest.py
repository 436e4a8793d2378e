"""`unparrot ingest`: make a pool from any supported input.

Tar shards (a folder, a glob or a brace pattern such as DataComp's `{00000000..00001023}.tar`) are used in
place: the pool only records where they are (pool.yaml). Other inputs are written as shards.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .flags import comma_list, option
from .io.readers import read_image_folder, read_imagenet_captions, read_parquet, read_table
from .io.samples import content_uid, normalize_uid
from .io.sizes import write_size_files
from .io.tar import ShardWriter
from .pool import Pool, atomic_write_bytes, expand_braces, list_source, write_errors
from .progress import progress_bar

FORMATS = ("auto", "wds", "parquet", "table", "imagenet-captions", "folder")


@dataclass
class IngestSummary:
    pool: str
    format: str
    n_in: int
    n_written: int
    n_err: int
    shards: int
    seconds: float
    in_place: bool

    def line(self) -> str:
        if self.in_place:
            return f"ingest: {self.shards} shards used in place (not copied) -> {self.pool}"
        return (
            f"ingest ({self.format}): {self.n_in} records: {self.n_written} written in {self.shards} shards, "
            f"{self.n_err} errors (errors/ingest) in {self.seconds:.1f}s -> {self.pool}"
        )


def detect_format(source: str) -> str:
    p = Path(source)
    if any(c in source for c in "*?{") or source.endswith(".tar"):
        return "wds"
    if p.is_dir():
        if any(p.rglob("*.tar")):
            return "wds"
        if any(p.glob("*.parquet")):
            return "parquet"
        return "folder"
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".csv", ".tsv", ".jsonl", ".ndjson"):
        return "table"
    if suffix == ".json":
        return "imagenet-captions"
    raise ValueError(f"cannot tell the format of {source!r}; pass format= one of {', '.join(FORMATS[1:])}")


@dataclass
class IngestConfig:
    """The options of `ingest()` (its signature defaults read these; the CLI's flags are made from them)."""

    source: str = option(
        help="shard folder/glob/{a..b} pattern, .parquet, .csv/.tsv/.jsonl, ImageNet-Captions .json, or image folder",
        positional=True,
    )
    pool: str = option(help="pool folder to create", positional=True)
    format: str = option("auto", "auto, wds, parquet, table, imagenet-captions, folder")
    shard_size: int = option(10000, "samples per written shard")
    image_col: str | None = option(None, "parquet column with image bytes")
    caption_col: str | None = option(None, "column with captions")
    path_col: str | None = option(None, "column with image paths")
    image_root: str | None = option(None, "folder that image paths are relative to (default: the table's folder)")
    sep: str | None = option(None, "CSV separator (default: tab for .tsv, comma otherwise)")
    caption_fields: tuple = option(
        ("title", "tags", "description"),
        "ImageNet-Captions fields joined into the caption (comma list)",
        item=comma_list,
        metavar="A,B,C",
    )
    caption_join: str = option(" ", "separator between ImageNet-Captions fields")


def ingest(
    source: str,
    pool: str | os.PathLike,
    format: str = IngestConfig.format,
    shard_size: int = IngestConfig.shard_size,
    image_col: str | None = IngestConfig.image_col,
    caption_col: str | None = IngestConfig.caption_col,
    path_col: str | None = IngestConfig.path_col,
    image_root: str | None = IngestConfig.image_root,
    sep: str | None = IngestConfig.sep,
    caption_fields: tuple[str, ...] = IngestConfig.caption_fields,
    caption_join: str = IngestConfig.caption_join,
    progress: bool = True,
) -> IngestSummary:
    """Create (or complete) pool folder `pool` from `source`. Re-running skips shards already written.

    Records that cannot be read (missing image file, unreadable table line) go to errors/ingest/ with
    their source location; everything else is written with its caption, metadata and uid in `.json`.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; one of {', '.join(FORMATS)}")
    if shard_size < 1:
        raise ValueError("shard_size must be positive")
    fmt = detect_format(source) if format == "auto" else format
    root = Path(pool)
    t0 = time.time()
    if fmt == "wds":
        # a relative folder, glob or brace pattern means the current directory's, now (pool.yaml is read
        # from elsewhere later); the shards are checked before anything is written, so a failed ingest
        # leaves no pool.yaml behind that `info` would read as an empty pool
        src = str(Path(source).resolve()) if Path(source).exists() else os.path.abspath(source)
        n = len(list_source(src))
        if n == 0:
            raise FileNotFoundError(f"no .tar shards found at {source}")
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(root / "pool.yaml", yaml.safe_dump({"shards": src}).encode())
        return IngestSummary(str(root), fmt, 0, 0, 0, len(Pool(root).shards()), time.time() - t0, True)
    root.mkdir(parents=True, exist_ok=True)

    if fmt == "parquet":
        files = sorted(Path(source).glob("*.parquet")) if Path(source).is_dir() else [Path(source)]
        records = (r for f in files for r in read_parquet(f, image_col, caption_col, path_col, image_root))
    elif fmt == "table":
        records = read_table(source, path_col, caption_col, image_root, sep)
    elif fmt == "imagenet-captions":
        records = read_imagenet_captions(source, image_root, caption_fields, caption_join)
    else:
        records = read_image_folder(source)

    shard_dir = root / "shards"
    errors, n_in, n_written = [], 0, 0
    writer = None
    bar = progress_bar(desc="ingest", unit="rec", disable=not progress)
    for rec in records:
        idx = n_in
        n_in += 1
        bar.update(1)
        if rec.problem or rec.image is None:
            errors.append({"uid": None, "key": rec.source, "reason": rec.problem or "no image"})
            continue
        shard_no = n_written // shard_size
        n_written += 1
        if (shard_dir / f"{shard_no:05d}.tar").exists():
            continue  # written by an earlier (interrupted) run
        if writer is None or writer.index != shard_no:
            if writer is not None:
                writer.close()
            writer = ShardWriter(str(shard_dir / "{:05d}.tar"), max_count=shard_size, start=shard_no)
        if "uid" in rec.meta and rec.meta["uid"] not in (None, ""):
            uid, source_uid = normalize_uid(rec.meta["uid"])
        else:
            uid, source_uid = content_uid(rec.image, rec.caption), None
        meta = {**rec.meta, "uid": uid, "source": rec.source}
        if source_uid:
            meta["source_uid"] = source_uid
        members = {rec.ext: rec.image}
        if rec.caption is not None:
            members["txt"] = rec.caption
            meta["caption"] = rec.caption
        members["json"] = json.dumps(meta, ensure_ascii=False, default=str)
        writer.write(f"{idx:09d}", members)
    if writer is not None:
        writer.close()
    bar.close()
    if shard_dir.is_dir():  # sizes.json + {shard}_stats.json: open_clip_train and DataComp's resharder read them
        write_size_files(shard_dir)
    write_errors(root / "errors" / "ingest" / "ingest.parquet", "ingest", "ingest", errors)
    summary = IngestSummary(
        str(root), fmt, n_in, n_written, len(errors), len(list(shard_dir.glob("*.tar"))), time.time() - t0, False
    )
    atomic_write_bytes(root / "ingest.json", json.dumps({"source": str(source), **summary.__dict__}).encode())
    return summary


__all__ = ["ingest", "detect_format", "IngestSummary", "expand_braces"]
