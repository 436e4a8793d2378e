"""Readers of non-shard inputs: parquet, a folder with a CSV/TSV/JSONL of (path, caption), ImageNet-Captions.

Each yields `Record`s (image bytes, caption, metadata, problem); `ingest` writes them as shards. Readers
stream: parquet row group by row group, tables line by line, and images are read only when yielded.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from ..imaging.decode import IMAGE_EXTS

IMAGE_COLUMNS = ("image", "jpg", "img", "image_bytes", "png", "webp")
PATH_COLUMNS = ("filepath", "path", "image_path", "file", "filename", "file_name", "img_path")
CAPTION_COLUMNS = ("caption", "title", "text", "txt", "alt", "sentence")
MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass
class Record:
    image: bytes | None
    caption: str | None
    meta: dict = field(default_factory=dict)
    ext: str = "jpg"
    problem: str | None = None
    source: str = ""


def _pick(
    names: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, where: str, required: bool = True
) -> str | None:
    if wanted:
        if wanted not in names:
            raise KeyError(f"{where}: no column {wanted!r} for the {what} (columns: {', '.join(names)})")
        return wanted
    for c in candidates:
        if c in names:
            return c
    if required:
        raise KeyError(f"{where}: cannot find the {what} column among {', '.join(names)}; name it explicitly")
    return None


def _ext_of(name: str, data: bytes | None = None) -> str:
    ext = Path(name).suffix.lower().lstrip(".")
    if ext in IMAGE_EXTS:
        return "jpg" if ext == "jpeg" else ext
    if data:
        if data[:3] == b"\xff\xd8\xff":
            return "jpg"
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return "png"
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return "webp"
    return "jpg"


def _read_file(path: Path) -> tuple[bytes | None, str | None]:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return None, f"image file {path} is {size} bytes (limit {MAX_FILE_BYTES})"
        return path.read_bytes(), None
    except OSError as e:
        return None, f"cannot read image file {path}: {e.strerror or e}"


def _resolve(base: Path, rel: str) -> Path:
    """Image paths in tables are relative to the table's folder unless absolute."""
    p = Path(rel)
    return p if p.is_absolute() else base / p


def _read_under(root: Path, rel: str) -> tuple[bytes | None, str | None]:
    """The image file a table names, only if it lies under `root` (image_root, default the table's folder)
    once `..` and symlinks are resolved: a table is input, and `../../etc/passwd` must not become a sample."""
    p = _resolve(root, rel)
    real, top = os.path.realpath(p), os.path.realpath(root)
    if os.path.commonpath([real, top]) != top:
        return None, f"image path {rel!r} is outside the image root {top} (pass image_root= a folder that holds it)"
    return _read_file(p)


def _caption(cap, col: str) -> tuple[str | None, str | None]:
    """(caption, problem): a caption is text or absent; a number, list or object is an error row (its
    string form, "[1, 2]", is no caption)."""
    if cap is None or isinstance(cap, str):
        return cap, None
    return None, f"caption in column {col!r} is a {type(cap).__name__}, not text"


def read_parquet(
    path: str | os.PathLike,
    image_col: str | None = None,
    caption_col: str | None = None,
    path_col: str | None = None,
    image_root: str | None = None,
    batch_rows: int = 256,
) -> Iterator[Record]:
    """Rows of a parquet file: image bytes (a binary column, or a {bytes, path} struct as Hugging Face
    datasets store it) or an image path column, plus a caption column; other scalar columns go to meta."""
    import pyarrow.parquet as pq

    path = Path(path)
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    icol = _pick(names, image_col, IMAGE_COLUMNS, "image", str(path), required=False)
    pcol = None if icol else _pick(names, path_col, PATH_COLUMNS, "image (bytes or path)", str(path))
    ccol = _pick(names, caption_col, CAPTION_COLUMNS, "caption", str(path))
    root = Path(image_root) if image_root else path.parent
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        for rec in batch.to_pylist():
            src = f"{path.name}:{row}"
            row += 1
            cap = rec.get(ccol)
            meta = {k: v for k, v in rec.items() if k not in (icol, pcol, ccol) and _jsonable(v)}
            problem, data, ext = None, None, "jpg"
            if icol:
                v = rec.get(icol)
                if isinstance(v, dict):  # HF datasets Image feature
                    data = v.get("bytes")
                    if data is None and v.get("path"):
                        data, problem = _read_under(root, v["path"])
                    ext = _ext_of(v.get("path") or "", data)
                elif isinstance(v, (bytes, bytearray)):
                    data = bytes(v)
                    ext = _ext_of("", data)
                elif v is None:
                    problem = f"no image in column {icol!r}"
                else:
                    problem = f"column {icol!r} holds a {type(v).__name__}, not image bytes"
            else:
                p = rec.get(pcol)
                if not p:
                    problem = f"empty image path in column {pcol!r}"
                else:
                    data, problem = _read_under(root, str(p))
                    ext = _ext_of(str(p), data)
            cap, cap_problem = _caption(cap, ccol)
            yield Record(data, cap, meta, ext, problem or cap_problem, src)


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, dict))


def read_table(
    path: str | os.PathLike,
    path_col: str | None = None,
    caption_col: str | None = None,
    image_root: str | None = None,
    sep: str | None = None,
) -> Iterator[Record]:
    """A CSV/TSV (open_clip's and LaCLIP's `filepath`/`title` layout) or JSONL of image paths and
    captions; paths are relative to `image_root` (default: the table's folder)."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path)
    else:
        sep = sep or ("\t" if path.suffix.lower() == ".tsv" else ",")
        rows = _csv_rows(path, sep)
    names = None
    for i, (rec, problem) in enumerate(rows):
        src = f"{path.name}:{i + 1}"
        if problem:
            yield Record(None, None, {}, "jpg", problem, src)
            continue
        if names is None:
            names = list(rec)
            pcol = _pick(names, path_col, PATH_COLUMNS, "image path", str(path))
            ccol = _pick(names, caption_col, CAPTION_COLUMNS, "caption", str(path))
        p = rec.get(pcol)
        cap = rec.get(ccol)
        meta = {k: v for k, v in rec.items() if k not in (pcol, ccol) and _jsonable(v)}
        cap, cap_problem = _caption(cap, ccol)
        if not p:
            yield Record(None, cap, meta, "jpg", f"empty image path in column {pcol!r}", src)
            continue
        data, problem = _read_under(root, str(p)) if cap_problem is None else (None, cap_problem)
        yield Record(data, cap, meta, _ext_of(str(p), data), problem, src)


def _csv_rows(path: Path, sep: str):
    """Rows of a CSV/TSV; a row with bad bytes or a malformed field is an error row, and reading goes on."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=sep)
        while True:
            line = reader.line_num
            try:
                rec = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield None, f"unreadable table line {line + 1}: {e}"
                continue
            bad = [k for k, v in rec.items() if _has_bad_bytes(k) or _has_bad_bytes(v)]
            if bad:
                yield None, f"table line {reader.line_num}: not valid UTF-8 in column {bad[0]!r}"
                continue
            yield rec, None


def _has_bad_bytes(v) -> bool:
    if isinstance(v, list):
        return any(_has_bad_bytes(x) for x in v)
    return isinstance(v, str) and any("\udc80" <= ch <= "\udcff" for ch in v)


def _jsonl_rows(path: Path):
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line.decode("utf-8"))
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                yield rec, None
            except (UnicodeDecodeError, ValueError) as e:
                yield None, f"invalid JSONL line: {e}"


def imagenet_caption(rec: dict, fields: Sequence[str] = ("title", "tags", "description"), sep: str = " ") -> str:
    """ImageNet-Captions caption: title, tags and description joined (docs/methods.md §5), order configurable."""
    parts = []
    for f in fields:
        v = rec.get(f)
        if isinstance(v, list):
            v = " ".join(str(t) for t in v if t)
        if v:
            parts.append(str(v).strip())
    return sep.join(p for p in parts if p)


def read_imagenet_captions(
    path: str | os.PathLike,
    image_root: str | None = None,
    fields: Sequence[str] = ("title", "tags", "description"),
    sep: str = " ",
) -> Iterator[Record]:
    """ImageNet-Captions: a JSON list (or JSONL) of {filename, wnid, title, description, tags}; images are
    found at `image_root`/<wnid>/<filename> or `image_root`/<filename>."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        recs = _jsonl_rows(path)
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: ImageNet-Captions JSON must be a list of records")
        recs = ((r, None) if isinstance(r, dict) else (None, "record is not a JSON object") for r in data)
    for i, (rec, problem) in enumerate(recs):
        src = f"{path.name}:{i}"
        if problem:
            yield Record(None, None, {}, "jpg", problem, src)
            continue
        fn, wnid = rec.get("filename"), rec.get("wnid")
        meta = {k: rec[k] for k in ("filename", "wnid", "title", "description", "tags") if k in rec}
        cap = imagenet_caption(rec, fields, sep)
        if not fn:
            yield Record(None, cap, meta, "jpg", "record without a filename", src)
            continue
        cands = ([Path(str(wnid)) / str(fn)] if wnid else []) + [Path(str(fn))]
        hit = next((c for c in cands if (root / c).exists()), None)
        if hit is None:
            yield Record(None, cap, meta, "jpg", f"image {fn} not found under {root}", src)
            continue
        data, problem = _read_under(root, str(hit))
        yield Record(data, cap, meta, _ext_of(fn, data), problem, src)


def read_image_folder(folder: str | os.PathLike) -> Iterator[Record]:
    """Images with a caption in a sibling .txt of the same stem (folder layout of many scrapes)."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower().lstrip(".") not in IMAGE_EXTS:
            continue
        data, problem = _read_file(p)
        t = p.with_suffix(".txt")
        cap = None
        if t.exists():
            try:
                cap = t.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                problem = problem or f"caption file {t.name} is not valid UTF-8"
        else:
            problem = problem or f"no caption file {t.name}"
        yield Record(
            data, cap, {"path": str(p.relative_to(folder))}, _ext_of(p.name, data), problem, str(p.relative_to(folder))
        )
