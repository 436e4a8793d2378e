"""Shard-size files beside webdataset shards, in the two layouts the peer tools read.

- `sizes.json`: `{"00000.tar": 1000, ...}`, shard file name -> samples. open_clip_train (and webdataset's
  tools) read it from the shards' folder to know the epoch size without `--train-num-samples`; DataComp's
  resharder reads it as its shard table (`--shard-table`, default `sizes.json`).
- `{shard}_stats.json`: img2dataset's per-shard statistics (`00000_stats.json` beside `00000.tar`); DataComp's
  resharder reads its `successes` when a shard is not in the table. unparrot writes `count` and `successes`
  (both the samples in the shard: every sample it writes is a success; records it could not write are rows
  of `errors/`, not part of a shard).

unparrot writes both for the shards it writes (`synth`, `ingest` of non-shard inputs, `reshard`), and reads
either (for `info`) from any shard folder, img2dataset's output included.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..pool import atomic_write_bytes
from .tar import count_samples

SIZES_FILE = "sizes.json"
STATS_SUFFIX = "_stats.json"


def write_size_files(folder: str | os.PathLike) -> dict[str, int]:
    """Count the samples of every `.tar` in `folder` (tar headers only) and write `sizes.json` and one
    `{shard}_stats.json` per shard. Returns the sizes."""
    folder = Path(folder)
    sizes = {p.name: count_samples(p) for p in sorted(folder.glob("*.tar"))}
    for name, n in sizes.items():
        stats = {"count": n, "successes": n}
        atomic_write_bytes(folder / (name[: -len(".tar")] + STATS_SUFFIX), json.dumps(stats).encode())
    atomic_write_bytes(folder / SIZES_FILE, json.dumps(sizes, indent=1).encode())
    return sizes


def read_shard_size(tar_path: str | os.PathLike) -> int | None:
    """A shard's sample count from the size files beside it (`sizes.json`, else `{shard}_stats.json`'s
    `successes`), or None when neither has it. Malformed files count as absent."""
    p = Path(tar_path)
    try:
        sizes = json.loads((p.parent / SIZES_FILE).read_text())
        if isinstance(sizes, dict) and isinstance(sizes.get(p.name), int):
            return int(sizes[p.name])
    except (OSError, ValueError):
        pass
    stem = p.name[: -len(".tar")] if p.name.endswith(".tar") else p.stem
    try:
        stats = json.loads((p.parent / (stem + STATS_SUFFIX)).read_text())
        if isinstance(stats, dict) and isinstance(stats.get("successes"), int):
            return int(stats["successes"])
    except (OSError, ValueError):
        pass
    return None


def shard_samples(tar_path: str | os.PathLike) -> int:
    """A shard's sample count: from its size files when they have it, else from its tar headers."""
    n = read_shard_size(tar_path)
    return count_samples(tar_path) if n is None else n
