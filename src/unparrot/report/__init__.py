"""`unparrot report`: one self-contained HTML page (images and plots inlined) about a pool and its runs.

Sections are plain functions in the `SECTIONS` dict, each `fn(ctx) -> Section | None` (None when the
data it shows is absent), so later stages add their section without touching the others.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..flags import option
from ..pool import Pool, atomic_write_bytes
from .html import Section, page


@dataclass
class Context:
    pool: Pool
    options: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)


def _lazy(module: str, fn: str):
    """A section that imports its module (and matplotlib) only when the report is built."""

    def section(ctx):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), fn)(ctx)

    return section


SECTIONS: dict = {
    "profile": _lazy("profile_section", "profile_section"),
    "clip": _lazy("curation_section", "clip_section"),
    "clusters": _lazy("curation_section", "cluster_section"),
    "funnel": _lazy("curation_section", "funnel_section"),
    "deparrot": _lazy("deparrot_section", "deparrot_section"),
    "results": _lazy("results_section", "results_section"),
}


def register_section(name: str, fn, after: str | None = None):
    """Add a section (kept in insertion order, or placed after `after`)."""
    if after is None or after not in SECTIONS:
        SECTIONS[name] = fn
        return
    items = list(SECTIONS.items())
    i = [k for k, _ in items].index(after) + 1
    items.insert(i, (name, fn))
    SECTIONS.clear()
    SECTIONS.update(items)


@dataclass
class ReportConfig:
    """The options of `report()` (its signature defaults read these; the CLI's flags are made from them)."""

    out: str | None = option(None, "output file (default POOL/report.html)")
    sections: list | None = option(None, "sections to include (default: all with data)", nargs="*")
    title: str | None = option(None, "page title (default: the pool's name)")


def report(
    pool: Pool | str,
    out: str | os.PathLike | None = ReportConfig.out,
    sections: list[str] | None = ReportConfig.sections,
    title: str | None = ReportConfig.title,
    **options,
) -> Path:
    """Write the HTML report of `pool` (default POOL/report.html) and return its path."""
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    names = sections or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise KeyError(f"unknown report sections {unknown}; known: {', '.join(SECTIONS)}")
    ctx = Context(pool, options)
    built: list[Section] = []
    for n in names:
        s = SECTIONS[n](ctx)
        if s is not None:
            built.append(s)
    if not built:
        raise FileNotFoundError(f"nothing to report in {pool.root}: run `unparrot profile` first")
    out = Path(out) if out else pool.root / "report.html"
    html = page(
        title or f"unparrot report: {pool.root.name}",
        built,
        f"pool {pool.root} - generated {time.strftime('%Y-%m-%d %H:%M')}",
    )
    atomic_write_bytes(out, html.encode("utf-8"))
    return out
