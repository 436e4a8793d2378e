"""unparrot: find, measure and remove the text-spotting (parrot caption) bias in image-text data for CLIP.

The Python functions are the API (the CLI wraps them):
    synth, ingest, run_stage, reshard, Pool, read_subset, write_subset, ...
Heavy dependencies (torch, rapidocr, faiss, llama.cpp) are imported only by the stages that need them.
"""

__version__ = "0.1.0"

from .engine import run, run_stage  # noqa: E402
from .ingest import ingest  # noqa: E402
from .curate.reshard import reshard  # noqa: E402
from .pool import Pool, read_subset, u8_to_uids, uids_to_u8, write_subset  # noqa: E402
from .synth.generate import synth  # noqa: E402
from .models import register_on_import  # noqa: E402

register_on_import()  # open_clip knows unparrot's model configs once both are imported, in either order

__all__ = ["Pool", "ingest", "read_subset", "reshard", "run", "run_stage", "synth", "u8_to_uids",
           "uids_to_u8", "write_subset", "__version__"]
