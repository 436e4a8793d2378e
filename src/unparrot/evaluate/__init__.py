"""Evaluation of any open_clip model or checkpoint: zero-shot classification (with typographic-attack
metrics on attacked sets), retrieval, Sync score, and effective robustness across models.

`evaluate(...)` writes one JSON per (model, task, dataset) in CLIP_benchmark's shape, with the per-item
outcomes beside it (`.npz`: keys, labels, predictions or cosines; what verdicts are computed from), and skips
a result whose inputs (model, checkpoint, set files, words) are unchanged.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dataclasses import dataclass

from ..flags import comma_list, named_paths, option
from .attack import build_attack
from .datasets import load_set
from .results import (
    ResultsConfig,
    outcomes_path,
    read_outcomes,
    read_results,
    result_path,
    results_table,
    write_outcomes,
    write_result,
)
from .robustness import robustness

TASKS = ("zeroshot", "retrieval", "sync")


@dataclass
class EvaluateConfig:
    """The options of `evaluate()` (its signature defaults read these; the CLI's flags are made from them;
    `sync_words` comes from the CLI's --sync-vocab)."""

    model: str = option(help="open_clip architecture or unparrot config")
    pretrained: str | None = option(None, "checkpoint file (or open_clip tag)")
    datasets: dict | None = named_paths("labelled set for zeroshot (repeatable)", aliases=("--dataset",))
    tasks: tuple = option(("zeroshot",), "comma list of " + ", ".join(TASKS), item=comma_list, metavar="A,B")
    out: str = option(ResultsConfig.out, "results folder")
    name: str | None = option(None, "name of the model in the results (default: the run folder or model)")
    retrieval_sets: dict | None = named_paths("set with captions for retrieval (repeatable)", aliases=("--retrieval",))
    sync_words: list | None = option(None, "words to render for the Sync score")
    sync_font_scale: float | None = option(None, "font px / canvas (default 32/224)")
    templates: str | None = option(None, "openai, simple, plain or a file (default: the set's own)")
    batch_size: int = option(64, "images per forward pass")
    overwrite: bool = option(False, "recompute existing results")


def evaluate(
    model: str,
    pretrained: str | None = EvaluateConfig.pretrained,
    datasets: dict[str, str] | None = EvaluateConfig.datasets,
    tasks: tuple[str, ...] = EvaluateConfig.tasks,
    out: str | os.PathLike = EvaluateConfig.out,
    name: str | None = EvaluateConfig.name,
    retrieval_sets: dict[str, str] | None = EvaluateConfig.retrieval_sets,
    sync_words: list[str] | None = EvaluateConfig.sync_words,
    sync_font_scale: float | None = EvaluateConfig.sync_font_scale,
    templates: str | None = EvaluateConfig.templates,
    batch_size: int = EvaluateConfig.batch_size,
    overwrite: bool = EvaluateConfig.overwrite,
    progress: bool = True,
) -> list[dict]:
    """Evaluate one model. `datasets` (name -> labelled set folder) feed `zeroshot`; `retrieval_sets` (or
    `datasets`) feed `retrieval`; `sync_words` (a list, or read from a vocab CSV) feed `sync`. Returns the
    result records (existing ones are read, not recomputed, unless `overwrite`)."""
    from ..models import load_clip

    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise KeyError(
            f"unknown tasks {bad}; known: {', '.join(TASKS)} (robustness runs across models: `unparrot robustness`)"
        )
    name = name or (Path(pretrained).parent.parent.name if pretrained and os.path.exists(pretrained) else model)
    datasets = dict(datasets or {})
    jobs = []
    if "zeroshot" in tasks:
        if not datasets:
            raise ValueError("zeroshot needs at least one labelled set (--datasets NAME=PATH)")
        jobs += [("zeroshot", d, p) for d, p in datasets.items()]
    if "retrieval" in tasks:
        jobs += [("retrieval", d, p) for d, p in (retrieval_sets or datasets).items()]
    if "sync" in tasks:
        if not sync_words:
            raise ValueError("sync needs words (--sync-vocab FILE: a vocab CSV or one word per line)")
        jobs.append(("sync", "rendered-vocab", None))
    for _, d, p in jobs:  # every input checked before any model is loaded
        if p is not None:
            load_set(p, d, templates)
    digest = {j: _inputs_digest(model, pretrained, j, sync_words, sync_font_scale, templates) for j in jobs}

    def done(j) -> bool:
        rp = result_path(out, name, j[0], j[1])
        has_outcomes = j[0] == "retrieval" or outcomes_path(out, name, j[0], j[1]).exists()
        return rp.exists() and has_outcomes and json.loads(rp.read_text()).get("inputs") == digest[j]

    todo = [j for j in jobs if overwrite or not done(j)]
    records = []
    clip = load_clip(model, pretrained) if todo else None
    for task, d, p in jobs:
        rp = result_path(out, name, task, d)
        if (task, d, p) not in todo:
            records.append(json.loads(rp.read_text()))
            continue
        t0 = time.time()
        per_item: dict = {}
        if task == "sync":
            from .sync import sync_score

            metrics = sync_score(clip, sync_words, font_scale=sync_font_scale, batch=batch_size, outcomes=per_item)
        else:
            from .zeroshot import retrieval, zeroshot

            ds = load_set(p, d, templates)
            metrics = (
                zeroshot(clip, ds, batch_size, outcomes=per_item)
                if task == "zeroshot"
                else retrieval(clip, ds, batch_size)
            )
        metrics["seconds"] = round(time.time() - t0, 2)
        if per_item:
            write_outcomes(out, name, task, d, per_item)
        write_result(
            out, name, task, d, metrics, pretrained=pretrained, architecture=model, path=p, inputs=digest[(task, d, p)]
        )
        records.append(json.loads(rp.read_text()))
        if progress:
            head = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
            print(f"evaluate {name} {task} {d}: {head}")
    return records


def _inputs_digest(model, pretrained, job, words, font_scale, templates) -> str:
    """What a result was computed from (model, checkpoint file, set files, words): a rerun recomputes a
    result whose inputs changed (a retrained checkpoint, a regenerated set) and skips the others."""
    import hashlib

    def stamp(path) -> list:
        p = Path(path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []
        return [
            (str(f.relative_to(p) if p.is_dir() else f.name), f.stat().st_size, f.stat().st_mtime_ns) for f in files
        ]

    task, _, path = job
    parts = [model, str(pretrained), stamp(pretrained) if pretrained else [], task, templates]
    parts += [stamp(path)] if path else [list(words or []), font_scale]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


__all__ = [
    "evaluate",
    "build_attack",
    "load_set",
    "read_outcomes",
    "read_results",
    "results_table",
    "robustness",
    "write_result",
]
