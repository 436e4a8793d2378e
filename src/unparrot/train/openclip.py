"""The same shards trained with open_clip's own trainer (`open_clip_train.main`), for comparison.

unparrot's model configs are registered with open_clip first; nothing else differs from a plain
`python -m open_clip_train.main ...` call.
"""

from __future__ import annotations

import sys
from pathlib import Path

_MAIN = (
    "import sys, unparrot.models as m; m.register_configs(); from open_clip_train.main import main; main(sys.argv[1:])"
)


def shard_pattern(folder: str | Path) -> str:
    """'{00000..0000N}.tar' brace pattern of a reshard output (open_clip's --train-data syntax)."""
    tars = sorted((Path(folder) / "shards").glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no shards in {folder}/shards")
    return str(Path(folder) / "shards") + "/{%s..%s}.tar" % (tars[0].stem, tars[-1].stem)


def open_clip_command(
    train_data: str | Path,
    logs: str | Path,
    name: str,
    model: str = "unparrot-rn-tiny",
    samples: int = 6400,
    batch_size: int = 64,
    workers: int = 1,
    lr: float = 1e-3,
    warmup: int = 5,
    log_every: int = 10,
    extra: list[str] | None = None,
) -> list[str]:
    """The command line of one epoch of `samples` samples with open_clip_train on a reshard output folder."""
    return [
        sys.executable,
        "-c",
        _MAIN,
        "--train-data",
        shard_pattern(train_data),
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(samples),
        "--batch-size",
        str(batch_size),
        "--epochs",
        "1",
        "--model",
        model,
        "--workers",
        str(workers),
        "--device",
        "cpu",
        "--logs",
        str(logs),
        "--name",
        name,
        "--lr",
        str(lr),
        "--warmup",
        str(warmup),
        "--precision",
        "fp32",
        "--log-every-n-steps",
        str(log_every),
    ] + list(extra or [])
