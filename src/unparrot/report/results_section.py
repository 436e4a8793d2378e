"""Report section of training and evaluation results: the table, bar charts per metric, ER plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .html import Section, fig_tag, table


def verdict_plot(findings: list[dict]) -> str | None:
    """The findings' differences (treatment − control, or ER against the family's line) with their 95%
    intervals, one row per finding, coloured by verdict, with zero and each equivalence margin marked: the
    reader sees at once which intervals clear the claim's boundary. None when nothing was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [f for f in findings if f.get("verdict") not in (None, "not run")]
    if not done:
        return None
    colors = {"holds": "#2a9d4a", "fails": "#c0392b", "inconclusive": "#888888"}
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(done) + 1.0))
    for y, f in enumerate(done[::-1]):
        c = colors[f["verdict"]]
        ax.errorbar(
            f["estimate"],
            y,
            xerr=[[f["estimate"] - f["low"]], [f["high"] - f["estimate"]]],
            fmt="o",
            color=c,
            ms=4,
            capsize=3,
        )
        m = f["claim"]["margin"]
        if m:
            ax.plot(
                [-m, m] if f["claim"]["direction"] == "0" else [-m if f["claim"]["direction"] == "+" else m] * 2,
                [y, y],
                "|",
                color="#333333",
                ms=10,
            )
    ax.axvline(0, color="k", lw=0.7)
    ax.set_yticks(range(len(done)), [f"{f['id']} ({f['verdict']})" for f in done[::-1]], fontsize=8)
    ax.set_xlabel("difference (treatment − control; ER: vs the family's line), 95% CI")
    return fig_tag(fig, "findings: differences with their intervals")


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
        plot = verdict_plot(findings)
        body.append(
            "<h3>Findings</h3><p class='note'>Verdicts by the protocol's rule (docs/protocol.md): holds when "
            "the 95% interval clears the claim's boundary on the claimed side (and every seed agrees), fails "
            "when it lies on the other side, inconclusive otherwise.</p>"
            + (f'<div class="figs">{plot}</div>' if plot else "")
            + table(
                ["id", "finding", "paper", "verdict", "difference [95% CI]"],
                [[f["id"], f["finding"], f.get("paper", ""), f["verdict"], f["text"]] for f in findings],
            )
        )
    return Section("results", "Training and evaluation results", "".join(body))
