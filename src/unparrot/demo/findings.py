"""The demo's findings from finished runs: the numbers per model (read from one results index), the results
and ER tables, and the summary over seeds (mean ± std and the pooled verdicts)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..evaluate.metrics import mean_std

SHIFTS = ("shift-background", "shift-sketch", "shift-invert")

COLUMNS = {  # table heading -> (task, dataset, metric); "shift" is averaged over the shifts
    "clean acc": ("zeroshot", "clean", "acc1"),
    "attacked acc": ("zeroshot", "attack", "acc1"),
    "attack success": ("zeroshot", "attack", "attack_success_rate"),
    "control acc": ("zeroshot", "attack-control", "acc1"),
    "Sync gap": ("sync", "rendered-vocab", "sync_gap"),
    "read top-1": ("sync", "rendered-vocab", "read_top1"),
    "shift acc (mean)": None,
}

NAN = float("nan")


def results_index(results_dir: str | os.PathLike) -> dict[tuple[str, str, str], dict]:
    """(model, task, dataset) -> metrics of every result under `results_dir` (the demo's results/ or
    er/results/): the one lookup the tables and numbers read from."""
    from ..evaluate.results import read_results

    return {(r["model"], r["task"], r["dataset"]): r["metrics"] for r in read_results(Path(results_dir))}


def metric(index: dict, model: str, task: str, dataset: str, name: str) -> float:
    """One number from a results index (nan where the result or the metric is missing)."""
    return index.get((model, task, dataset), {}).get(name, NAN)


def model_numbers(out: str | os.PathLike) -> dict[str, dict[str, float]]:
    """The findings' numbers per model of one demo run, read from its results/ (nan where missing)."""
    by = results_index(Path(out) / "results")
    res = {}
    for m in dict.fromkeys(mm for mm, _, _ in by):
        row = {k: metric(by, m, *v) for k, v in COLUMNS.items() if v}
        row["shift acc (mean)"] = mean_std([metric(by, m, "zeroshot", d, "acc1") for d in SHIFTS])[0]
        res[m] = row
    return res


def fmt(k: str, v: float) -> str:
    """A table cell: ER signed to 4 places, the Sync gap to 4, accuracies and rates to 3."""
    return f"{v:+.4f}" if k.startswith("ER") else f"{v:.4f}" if k == "Sync gap" else f"{v:.3f}"


def protocol_digest(path: str) -> str:
    """The protocol file's digest: runs pooled by --summarize must have been run under the same protocol."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def demo_table(out: Path, pool, chosen, models: dict) -> str:
    """The findings' numbers, one row per model (markdown)."""
    nums = model_numbers(out)
    rows = ["| model | train subset | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for m in chosen:
        recipe = models[m]["subset"]
        meta = pool.subset_path(recipe).with_suffix(".json")
        kept = json.loads(meta.read_text())["kept"] if meta.exists() else ""
        subset = f"{recipe} ({kept})" + (" + rewrites" if models[m]["rewrites"] else "")
        if models[m].get("caption_column"):
            subset += f", captions: {models[m]['caption_column']}"
        vals = [fmt(k, nums.get(m, {}).get(k, NAN)) for k in COLUMNS]
        rows.append("| " + " | ".join([m, subset, *vals]) + " |")
    return "\n".join(rows)


def er_table(out: Path, proto) -> str:
    """ER treatments and the family's final models: accuracy on the ID set and each shift, ER per shift."""
    er = proto.er
    by = results_index(Path(out) / "er" / "results")
    names = list(er["family"]) + list(er["treatments"])
    head = [f"{er['id_set']} acc"] + [f"{x} acc" for x in er["shifts"]] + [f"ER {x}" for x in er["shifts"]]
    rows = ["| ER model | role | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    key = "+".join([er["id_set"]]) + "__" + "+".join(er["shifts"])
    for m in names:
        accs = [metric(by, m, "zeroshot", d, "acc1") for d in [er["id_set"], *er["shifts"]]]
        e = by.get((m, "robustness", key), {}).get("effective_robustness", {})
        ers = [e.get(f"{er['id_set']}->{x}", NAN) for x in er["shifts"]]
        role = "family" if m in er["family"] else "treatment"
        rows.append(
            f"| {m} | {role} | "
            + " | ".join([f"{a:.3f}" for a in accs] + ["" if np.isnan(x) else f"{x:+.4f}" for x in ers])
            + " |"
        )
    return "\n".join(rows)


def seeds_summary(outs: list[str | os.PathLike], protocol: str | None = None) -> str:
    """Over several demo runs (one per seed): mean ± std of the numbers, and every finding's pooled verdict
    (hierarchical bootstrap: seeds, then images), also over the seeds not used to choose settings."""
    from ..protocol import load_protocol, verdict_lines, verdicts

    outs = [Path(o) for o in outs]
    runs = [model_numbers(o) for o in outs]
    metas = [json.loads((o / "demo.json").read_text()) if (o / "demo.json").exists() else {} for o in outs]
    proto = load_protocol(protocol or next((m["protocol"] for m in metas if m.get("protocol")), "demo"))
    order = list(proto.models)
    models = sorted(dict.fromkeys(m for r in runs for m in r), key=lambda m: (order.index(m) if m in order else 99, m))
    lines = [f"{len(outs)} runs: {', '.join(str(o) for o in outs)}; protocol {proto.name} ({proto.path})", ""]
    shas = {m.get("protocol_sha256") for m in metas} - {None}
    if len(shas) > 1 or (shas and protocol_digest(proto.path) not in shas):
        lines[-1:] = [
            "WARNING: these runs were made under different versions of the protocol file (see its "
            "`changes`); their pooled verdicts mix protocols",
            "",
        ]
    lines += ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for m in models:
        cells = []
        for k in COLUMNS:
            v = [r[m][k] for r in runs if m in r]
            mean, std = mean_std(v, ddof=1) if len(v) > 1 else (mean_std(v)[0], 0.0)  # one run: no spread
            cells.append(f"{fmt(k, mean)} ± {fmt(k, std).lstrip('+')}")
        n = sum(m in r for r in runs)
        lines.append(f"| {m}{'' if n == len(runs) else f' ({n} runs)'} | " + " | ".join(cells) + " |")
    lines += ["", f"pooled verdicts over {len(outs)} runs (95% hierarchical bootstrap: seeds, then items):"]
    lines += verdict_lines(verdicts(outs, proto))
    first = int(proto.verdict.get("report_seeds_from", 0))
    fresh = [o for o, m in zip(outs, metas) if m.get("seed", -1) >= first]
    if first and proto.chosen_on_results and len(fresh) < len(outs):
        lines += [
            "",
            f"over the seeds >= {first} only (settings were chosen on earlier seeds; "
            "protocols/demo.yaml `chosen_on_results`):",
        ]
        lines += verdict_lines(verdicts(fresh, proto)) if fresh else ["  no such run among these"]
    return "\n".join(lines)
