"""`unparrot reshard`: write a subset of a pool as new webdataset shards (DataComp's resharder, in miniature).

Every member of a kept sample is copied unchanged (image, .txt, extra members), except `.json`, which gains
the requested columns (e.g. rewrites for LaCLIP training, has_text, clip_score). With `caption_column`
(e.g. `deparrot_caption`), `.txt` is that column's value instead and `.json` keeps the original caption
as `original_caption`, so `train` and open_clip's trainer use the new caption unchanged. The output
folder is a pool in its own right.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..flags import option
from ..imaging.mask import DEFAULT_FILL, FILLS, Masker
from ..ingest import IngestConfig
from ..io.samples import parse_sample
from ..io.sizes import write_size_files
from ..io.tar import ShardProblem, ShardWriter, iter_samples
from ..pool import Pool, atomic_write_bytes, read_subset, subset_contains, write_errors
from ..progress import progress_bar


@dataclass
class ReshardSummary:
    out: str
    subset: int
    written: int
    missing: int
    errors: int
    shards: int
    seconds: float

    def line(self) -> str:
        s = (
            f"reshard: {self.written} of {self.subset} subset samples written in {self.shards} shards "
            f"({self.seconds:.1f}s) -> {self.out}"
        )
        if self.missing:
            s += f"; {self.missing} subset uids not found in the pool"
        if self.errors:
            s += f"; {self.errors} unreadable samples (errors/reshard)"
        return s


def parse_columns(columns: Sequence[str] | None, pool: Pool) -> dict[str, list[str]]:
    """ "stage.column" or a bare column name (looked up across the pool's stages) -> {stage: [columns]}."""
    out: dict[str, list[str]] = {}
    for spec in columns or ():
        if "." in spec:
            st, col = spec.split(".", 1)
        else:
            st = None
            for cand in pool.stages():
                schema = pool.stage_schema(cand)
                if schema is not None and spec in schema.names:
                    st = cand
                    break
            if st is None:
                raise KeyError(f"column {spec!r} is in no stage of {pool.root} (stages: {pool.stages()})")
            col = spec
        out.setdefault(st, []).append(col)
    return out


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


@dataclass
class ReshardConfig:
    """The options of `reshard()` (its signature defaults read these; the CLI's flags are made from them)."""

    subset: str = option(help="subset .npy (sorted uids, dtype u8,u8)", positional=True)
    out: str = option(help="output folder", positional=True)
    shard_size: int = option(IngestConfig.shard_size, "samples per written shard")
    columns: list | None = option(None, "columns (stage.column or column) to add to each .json", nargs="*")
    mask_text: bool = option(False, "write images with text boxes masked (needs spot)")
    mask_fill: str = option(DEFAULT_FILL, "mean, inpaint or solid", choices=FILLS)
    spot_stage: str = option("spot", "stage with the text boxes (mask_text)")
    caption_column: str | None = option(
        None,
        "column (stage.column or column) written as each .txt instead of "
        "the caption, e.g. deparrot_caption; the original goes to .json "
        "original_caption",
    )


def reshard(
    pool: Pool | str,
    subset: str | os.PathLike | np.ndarray,
    out: str | os.PathLike,
    shard_size: int = ReshardConfig.shard_size,
    columns: Sequence[str] | None = ReshardConfig.columns,
    mask_text: bool = ReshardConfig.mask_text,
    mask_fill: str = ReshardConfig.mask_fill,
    spot_stage: str = ReshardConfig.spot_stage,
    progress: bool = True,
    caption_column: str | None = ReshardConfig.caption_column,
) -> ReshardSummary:
    """Write the samples of `pool` whose uid is in `subset` (a DataComp .npy or array) to `out/shards/`.

    `columns` ("stage.column" or column names) are added to each sample's .json. With `mask_text`, images
    are written with their text boxes (from `spot_stage`) filled (T-MARS style, see imaging/mask.py).
    `caption_column` ("stage.column" or a column name) becomes each sample's .txt; a sample whose value
    is null or missing is an error row, not written.
    """
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    sub = subset if isinstance(subset, np.ndarray) else read_subset(subset)
    wanted = parse_columns(columns, pool)
    caption_src = None
    if caption_column:
        ((cst, (ccol,)),) = parse_columns([caption_column], pool).items()
        caption_src = (cst, ccol)
        if ccol not in wanted.get(cst, []):
            wanted.setdefault(cst, []).append(ccol)
    masker = None
    if mask_text:
        masker = Masker(fill=mask_fill)
        if not pool.done_shards(spot_stage):
            raise FileNotFoundError(f"mask_text needs the {spot_stage!r} stage (run `unparrot profile` first)")
    out = Path(out)
    part = out / PARTIAL
    if (part / "reshard.json").exists():  # killed while moving a finished reshard into place: finish that
        return _move_into_place(out)
    if any((out / "shards").glob("*.tar")):
        raise FileExistsError(f"{out}/shards already holds shards; reshard writes into an empty folder")
    shutil.rmtree(part, ignore_errors=True)  # a killed reshard: start over (the output is deterministic)
    t0 = time.time()
    errors, written, found = [], 0, set()
    bar = progress_bar(total=len(sub), desc="reshard", unit="sample", disable=not progress)
    with ShardWriter(str(part / "shards" / "{:05d}.tar"), max_count=shard_size) as w:
        for sh in pool.shards():
            extra = {}
            for st, cols in wanted.items():
                if pool.column_path(st, sh.id).exists():
                    t = pool.read_columns(st, sh.id, ["uid"] + cols).to_pydict()
                    extra[st] = {u: i for i, u in enumerate(t["uid"])}, t
            boxes = None
            if masker is not None and pool.column_path(spot_stage, sh.id).exists():
                t = pool.read_columns(spot_stage, sh.id, ["uid", "boxes"]).to_pydict()
                boxes = dict(zip(t["uid"], t["boxes"]))
            batch: list = []
            for item in iter_samples(sh.path):
                if isinstance(item, ShardProblem):
                    errors.append({"uid": None, "key": item.after_key, "shard": sh.id, "reason": item.reason})
                    continue
                batch.append(item)
                if len(batch) >= 512:
                    written += _write_batch(
                        batch, sh.id, sub, w, wanted, extra, boxes, masker, errors, found, caption_src, columns
                    )
                    bar.n = written
                    bar.refresh()
                    batch = []
            written += _write_batch(
                batch, sh.id, sub, w, wanted, extra, boxes, masker, errors, found, caption_src, columns
            )
            bar.n = written
            bar.refresh()
    bar.close()
    if w.written:  # sizes.json + {shard}_stats.json: open_clip_train and DataComp's resharder read them
        write_size_files(part / "shards")
    write_errors(part / "errors" / "reshard" / "reshard.parquet", "reshard", "", errors)
    summary = ReshardSummary(
        str(out), len(sub), written, len(sub) - len(found), len(errors), len(w.written), time.time() - t0
    )
    atomic_write_bytes(part / "reshard.json", json.dumps({"pool": str(pool.root), **summary.__dict__}).encode())
    return _move_into_place(out)


# everything a reshard writes goes to OUT/.reshard.partial/ first; OUT/shards appears only once complete
PARTIAL = ".reshard.partial"


def unfinished(folder: str | os.PathLike) -> bool:
    """True for a reshard output folder whose reshard has not finished (killed, or still running)."""
    return (Path(folder) / PARTIAL).exists()


def _move_into_place(out: Path) -> ReshardSummary:
    """Rename a finished reshard from OUT/.reshard.partial into OUT: shards, errors, then the completion
    record `reshard.json`. Each step is skipped once done, so a run killed in here is finished by the next."""
    part = out / PARTIAL
    record = json.loads((part / "reshard.json").read_text())
    for name in ("shards", "errors/reshard"):
        src, dst = part / name, out / name
        if src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists() and not any(dst.iterdir()):
                dst.rmdir()
            elif dst.exists() and name != "shards":
                shutil.rmtree(dst)
            os.replace(src, dst)
    os.replace(part / "reshard.json", out / "reshard.json")
    shutil.rmtree(part, ignore_errors=True)
    return ReshardSummary(**{k: v for k, v in record.items() if k in ReshardSummary.__dataclass_fields__})


def _write_batch(
    items, shard_id, sub, w, wanted, extra, boxes, masker, errors, found, caption_src=None, columns=None
) -> int:
    rows = [parse_sample(it, shard_id) for it in items]
    keep = subset_contains(sub, [r["uid"] for r in rows]) if rows else []
    n = 0
    for it, row, k in zip(items, rows, keep):
        if not k or row["uid"] in found:
            continue
        found.add(row["uid"])
        if "sample" in row["problems"] or "image" in row["problems"]:
            errors.append(
                {
                    "uid": row["uid"],
                    "key": row["key"],
                    "shard": shard_id,
                    "reason": row["problems"].get("sample") or row["problems"]["image"],
                }
            )
            continue
        meta = dict(row["meta"])
        meta["uid"] = row["uid"]
        for st, cols in wanted.items():
            if st not in extra:
                continue
            index, table = extra[st]
            i = index.get(row["uid"])
            for c in cols:
                meta[c] = None if i is None else _jsonable(table[c][i])
        members = {ext: data for ext, data in it.members.items() if ext != "json"}
        if caption_src is not None:
            st, col = caption_src
            cap = meta.get(col) if st in extra else None
            if col not in (columns or ()) and not any(c.endswith("." + col) for c in columns or ()):
                meta.pop(col, None)  # asked for as the caption only: not repeated in .json
            if not isinstance(cap, str) or not cap:
                errors.append(
                    {
                        "uid": row["uid"],
                        "key": row["key"],
                        "shard": shard_id,
                        "reason": f"no caption in {st}.{col} (null, or the stage has no row for it)",
                    }
                )
                continue
            meta["original_caption"] = row["caption"]
            members["txt"] = cap.encode("utf-8")
        if masker is not None and boxes and boxes.get(row["uid"]):
            try:
                ext = row["image_ext"] if row["image_ext"] in ("jpg", "jpeg", "png", "webp") else "png"
                data = masker.mask_bytes(row["image"], boxes[row["uid"]], ext)
                members.pop(row["image_ext"])
                members[ext] = data
                meta["masked"] = True
            except Exception as e:  # noqa: BLE001 - an undecodable image is an error row, not a crash
                errors.append(
                    {"uid": row["uid"], "key": row["key"], "shard": shard_id, "reason": f"cannot mask image: {e}"}
                )
                continue
        text = json.dumps(meta, ensure_ascii=False, default=str)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape: keep it escaped
            text = json.dumps(meta, default=str)
        members["json"] = text
        w.write(row["key"], members)
        n += 1
    return n
