"""Progress bars for long loops: items/s and ETA on a terminal, a line every ~15 s in a log file."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total=None, desc: str = "", unit: str = "it", disable: bool = False, **kw):
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=disable,
        dynamic_ncols=True,
        mininterval=0.2 if tty else 15.0,
        smoothing=0.1,
        file=sys.stderr,
        **kw,
    )
