"""Report section of training and evaluation results: the table, bar charts per metric, ER plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .html import Section, fig_tag, table

VERDICT = {True: "yes", False: "NO", None: "not run"}


def results_section(ctx) -> Section | None:
    out = ctx.options.get("results_dir") or (ctx.pool.root / "results")
    out = Path(out)
    if not out.exists() or not any(out.glob("*/*.json")):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluate.results import read_results

    recs = read_results(out)
    models = ctx.options.get("model_order") or sorted({r["model"] for r in recs})
    by = {(r["model"], r["task"], r["dataset"]): r["metrics"] for r in recs}
    datasets = sorted(
        {r["dataset"] for r in recs if r["task"] == "zeroshot"},
        key=lambda d: (d != "clean", not d.startswith("attack"), d),
    )
    rows = []
    for m in models:
        row = [m]
        for d in datasets:
            z = by.get((m, "zeroshot", d))
            row.append("" if z is None else f"{z['acc1']:.3f}")
        att = by.get((m, "zeroshot", "attack"), {})
        row.append(f"{att['attack_success_rate']:.3f}" if "attack_success_rate" in att else "")
        s = next((v for (mm, t, _), v in by.items() if mm == m and t == "sync"), None)
        row += [f"{s['sync_gap']:.4f}" if s else "", f"{s['read_top1']:.3f}" if s else ""]
        er = next((v for (mm, t, _), v in by.items() if mm == m and t == "robustness"), None)
        row.append(f"{er['effective_robustness']['mean']:+.4f}" if er else "")
        rows.append(row)
    header = ["model"] + [f"{d} acc1" for d in datasets] + ["attack success", "Sync gap", "read top-1", "ER (mean)"]
    body = [ctx.options.get("results_note", ""), table(header, rows)]
    figs = []
    metrics = [
        ("clean acc1", lambda m: by.get((m, "zeroshot", "clean"), {}).get("acc1")),
        ("attack success", lambda m: by.get((m, "zeroshot", "attack"), {}).get("attack_success_rate")),
        ("Sync gap", lambda m: next((v["sync_gap"] for (mm, t, _), v in by.items() if mm == m and t == "sync"), None)),
    ]
    for title, get in metrics:
        vals = [get(m) for m in models]
        if all(v is None for v in vals):
            continue
        fig, ax = plt.subplots(figsize=(5.2, 3.2))
        ax.bar(range(len(models)), [np.nan if v is None else v for v in vals], color="#4a7bd0")
        ax.set_xticks(range(len(models)), models, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
        figs.append(fig_tag(fig, title))
    er_png = ctx.options.get("robustness_plot")
    if er_png and Path(er_png).exists():
        from PIL import Image

        from .html import img_tag

        figs.append(img_tag(Image.open(er_png), "effective robustness", fmt="PNG"))
    body.append(f'<div class="figs">{"".join(figs)}</div>')
    findings = ctx.options.get("findings")
    if findings:
        body.append(
            "<h3>Findings</h3>"
            + table(
                ["finding", "holds", "numbers"],
                [[f["finding"], VERDICT[f["holds"]], f["detail"]] for f in findings],
            )
        )
    return Section("results", "Training and evaluation results", "".join(body))
