"""The operator contract shared by every engine (ARCHITECTURE.md; docs/engine.md).

An operator is a callable class: `__init__(**params)` loads models once; `__call__(batch)` takes a dict of
equal-length columns (lists or 1-D/2-D numpy arrays) and returns new columns for the same rows, in the
same order. A row that cannot be processed gets a reason in the returned `error` column (None when
fine); engines move such rows to the errors table. No I/O, no global state: exactly what Ray Data's
`map_batches` accepts.

Batch columns an engine provides: `uid`, `key`, `shard`, `image` (encoded bytes), `image_ext`, `caption`,
`meta` (the sample's .json as a dict), and the columns named in the operator's `inputs` from earlier stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..imaging.decode import DecodeError


@dataclass(frozen=True)
class Outputs:
    """What a stage writes besides uid and key: its columns (name -> arrow type) and its embeddings
    (name -> width). Engines give a shard where no sample could be processed (an empty or corrupt tar)
    exactly these, so a later stage or `select` never meets a shard without the stage's columns."""

    columns: dict = field(default_factory=dict)
    embeddings: dict = field(default_factory=dict)


class Operator:
    """Base class for per-sample stages. Subclasses set `needs`, `inputs` and implement `__call__`."""

    #: sample fields a row must have (image, caption, meta): a row missing one is an error row
    needs: tuple[str, ...] = ()
    #: earlier stages and the columns read from them, e.g. {"spot": ["texts"]}
    inputs: dict[str, list[str]] = {}
    #: bump when the output of the same parameters changes
    version: int = 1

    #: the columns written besides uid/key, as arrow types (see Outputs); operators with embeddings or
    #: parameter-dependent columns override `outputs`
    schema: dict = {}

    @classmethod
    def inputs_for(cls, params: dict) -> dict[str, list[str]]:
        """The input stages for these parameters (engines check they exist before any work)."""
        return cls.inputs

    @classmethod
    def outputs(cls, params: dict) -> Outputs:
        """The columns and embeddings this operator writes with these parameters."""
        return Outputs(dict(cls.schema))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError


def map_rows(fn: Callable[[int], dict], n: int, fields: Sequence[str]) -> dict[str, list]:
    """Apply `fn(i) -> dict of fields` to each row, turning per-row exceptions into `error` entries.

    Unexpected exceptions are caught too: one odd sample must never stop a run over millions.
    """
    out: dict[str, list] = {f: [] for f in fields}
    out["error"] = []
    for i in range(n):
        try:
            row = fn(i)
            err = None
        except DecodeError as e:
            row, err = {}, str(e)
        except Exception as e:  # noqa: BLE001 - recorded with its type, never swallowed silently
            row, err = {}, f"{type(e).__name__}: {e}"
        for f in fields:
            out[f].append(row.get(f))
        out["error"].append(err)
    return out


def column(batch: dict, name: str) -> list:
    """A batch column as a Python list (Ray gives numpy object arrays, the local engine gives lists)."""
    v = batch[name]
    return v.tolist() if isinstance(v, np.ndarray) and v.dtype == object else list(v)
