"""unparrot: find, measure and remove the text-spotting (parrot caption) bias in image-text data for CLIP.

The Python functions are the API (the CLI wraps them): `from unparrot import run, select, reshard, Pool`.
They load on first use (PEP 562), so `import unparrot` stays cheap. Heavy dependencies (torch, rapidocr,
faiss, llama.cpp) are imported only by the stages that need them. ARCHITECTURE.md maps the modules.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it, imported when the name is first used
EXPORTS = {
    "Pool": "pool",
    "read_subset": "pool",
    "write_subset": "pool",
    "u8_to_uids": "pool",
    "uids_to_u8": "pool",
    "run": "engine",
    "run_stage": "engine",
    "cluster": "curate.cluster",
    "select": "curate.select",
    "reshard": "curate.reshard",
    "audit": "evaluate.audit",
    "robustness": "evaluate.robustness",
    "export_open_clip": "models",
}

# `synth` and `ingest` share their name with a subpackage/module. Python's import system sets the
# package attribute to the submodule whenever that submodule is first imported, so a lazy export would
# turn into the module the moment any code imports `unparrot.ingest`. Binding the functions here, once,
# after the submodules have loaded, keeps `from unparrot import synth, ingest` the functions.
from .ingest import ingest  # noqa: E402, F401
from .synth.generate import synth  # noqa: E402, F401
from .models import register_on_import  # noqa: E402

register_on_import()  # open_clip knows unparrot's model configs once both are imported, in either order


def __getattr__(name: str):
    if name in EXPORTS:
        value = getattr(importlib.import_module(f".{EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unparrot' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(EXPORTS))


__all__ = sorted(["ingest", "synth", "__version__", *EXPORTS])
