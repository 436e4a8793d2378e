"""Results: one JSON file per (model, task, dataset), in CLIP_benchmark's shape; tables across models."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..flags import option


def result_path(out: str | os.PathLike, model: str, task: str, dataset: str) -> Path:
    safe = lambda s: re.sub(r"[^\w.\-]", "_", s)  # noqa: E731
    return Path(out) / safe(model) / f"{safe(task)}__{safe(dataset)}.json"


def write_result(
    out, model: str, task: str, dataset: str, metrics: dict, pretrained: str | None = None, **extra
) -> Path:
    p = result_path(out, model, task, dataset)
    p.parent.mkdir(parents=True, exist_ok=True)
    rec = {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": task,
        "metrics": metrics,
        "language": "en",
        **extra,
    }
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, p)
    return p


def outcomes_path(out: str | os.PathLike, model: str, task: str, dataset: str) -> Path:
    """Per-item outcomes beside a result (same stem, .npz): the result JSON keeps CLIP_benchmark's shape."""
    return result_path(out, model, task, dataset).with_suffix(".npz")


def write_outcomes(out, model: str, task: str, dataset: str, arrays: dict) -> Path:
    """Save per-item arrays (keys, labels, predictions, cosines) compressed, atomically."""
    import numpy as np

    p = outcomes_path(out, model, task, dataset)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.stem + ".tmp.npz")
    np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, p)
    return p


def read_outcomes(out, model: str, task: str, dataset: str) -> dict | None:
    """The per-item arrays of one result, or None when they were not saved (results from before they were)."""
    import numpy as np

    p = outcomes_path(out, model, task, dataset)
    if not p.exists():
        return None
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_results(out: str | os.PathLike) -> list[dict]:
    """Every result under `out/<model>/`: one record per file, or a list of them (an audit's card.json)."""
    recs = []
    for p in sorted(Path(out).glob("*/*.json")):
        r = json.loads(p.read_text())
        recs.extend(r if isinstance(r, list) else [r])
    return recs


def _headline(r: dict) -> dict:
    """The numbers a results table shows for one record."""
    m, t = r["metrics"], r["task"]
    if t == "zeroshot":
        out = {f"{r['dataset']} acc1": m.get("acc1")}
        if "attack_success_rate" in m:
            out[f"{r['dataset']} attack success"] = m["attack_success_rate"]
        return out
    if t == "retrieval":
        return {
            f"{r['dataset']} I2T R@1": m.get("text_retrieval_recall@1"),
            f"{r['dataset']} T2I R@1": m.get("image_retrieval_recall@1"),
        }
    if t == "sync":
        return {"sync": m.get("sync_mean"), "sync gap": m.get("sync_gap"), "read top1": m.get("read_top1")}
    if t == "typographic_attack":  # an audit card (unparrot audit)
        return {
            "audit clean acc1": m.get("clean_acc1"),
            "audit attacked acc1": m.get("attacked_acc1"),
            "audit control acc1": m.get("control_acc1"),
            "audit attack success": m.get("attack_success_rate"),
        }
    if t == "word_reading":
        return {"read top1": m.get("read_top1")}
    if t == "text_reliance":
        return {"text-carried share": m.get("carried_share"), "masked score drop": m.get("score_drop")}
    if t == "robustness":
        return {f"ER {k}": v for k, v in m.get("effective_robustness", {}).items()}
    return {}


@dataclass
class ResultsConfig:
    """The options of `results_table()` (its signature defaults read these); `out` is every results
    folder's default."""

    out: str = option("results", "results folder", positional=True)
    format: str = option("md", "md or csv")
    models: list | None = option(None, "models to show (default: all)", nargs="*")


def results_table(
    out: str | os.PathLike = ResultsConfig.out,
    format: str = ResultsConfig.format,
    models: list[str] | None = ResultsConfig.models,
) -> str:
    """Models x headline metrics as markdown or CSV (blank where a model lacks a result)."""
    rows: dict[str, dict] = {}
    for r in read_results(out):
        if models and r["model"] not in models:
            continue
        rows.setdefault(r["model"], {}).update({k: v for k, v in _headline(r).items() if v is not None})
    cols = sorted({c for v in rows.values() for c in v}, key=lambda c: (not c.startswith(("clean", "sync")), c))
    order = models or sorted(rows)

    def fmt_v(v):
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    if format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["model"] + cols)
        for m in order:
            if m in rows:
                w.writerow([m] + [fmt_v(rows[m].get(c)) for c in cols])
        return buf.getvalue()
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in order:
        if m in rows:
            lines.append(f"| {m} | " + " | ".join(fmt_v(rows[m].get(c)) for c in cols) + " |")
    return "\n".join(lines)
