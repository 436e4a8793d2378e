"""Effective robustness across models (Fang et al., METHODS.md §5) from zero-shot result files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .metrics import _link, effective_robustness, fit_trend
from .results import read_results, write_result


def accuracy_table(out: str | os.PathLike) -> dict[str, dict[str, float]]:
    """model -> dataset -> zero-shot top-1 accuracy."""
    acc: dict[str, dict[str, float]] = {}
    for r in read_results(out):
        if r["task"] == "zeroshot":
            acc.setdefault(r["model"], {})[r["dataset"]] = r["metrics"]["acc1"]
    return acc


def robustness(
    out: str | os.PathLike,
    id_sets: list[str],
    ood_sets: list[str],
    baselines: list[str] | None = None,
    link: str = "logit",
    models: list[str] | None = None,
    plot: str | os.PathLike | None = None,
) -> dict:
    """Fit link(acc_ood) = a link(acc_id) + b over `baselines` (default: every model) for each (ID, OOD) pair;
    ER per model and shift, averaged over shifts and ID sets. Writes a `robustness` result per model."""
    acc = accuracy_table(out)
    models = models or sorted(acc)
    baselines = baselines or models
    missing = [(m, d) for m in set(models) | set(baselines) for d in id_sets + ood_sets if d not in acc.get(m, {})]
    if missing:
        raise KeyError(f"zero-shot results missing for {missing[:4]} (run `unparrot evaluate` on those sets)")
    fits, per = {}, {m: {} for m in models}
    for i in id_sets:
        for o in ood_sets:
            a, b = fit_trend([acc[m][i] for m in baselines], [acc[m][o] for m in baselines], link)
            fits[f"{i}->{o}"] = {"a": a, "b": b}
            for m in models:
                per[m][f"{i}->{o}"] = effective_robustness(acc[m][i], acc[m][o], a, b, link)
    for m in models:
        per[m]["mean"] = float(np.mean(list(per[m].values())))
        write_result(
            out,
            m,
            "robustness",
            "+".join(id_sets) + "__" + "+".join(ood_sets),
            {"effective_robustness": per[m], "link": link, "baselines": baselines, "fits": fits},
        )
    if plot:
        plot_robustness(acc, id_sets, ood_sets, fits, link, models, plot)
    return {"fits": fits, "effective_robustness": per, "link": link, "baselines": baselines}


def plot_robustness(acc, id_sets, ood_sets, fits, link, models, path):
    """ID vs OOD accuracy per model on link-scaled axes with each baseline trend line (for the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(i, o) for i in id_sets for o in ood_sets]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.8), squeeze=False)
    for ax, (i, o) in zip(axes[0], pairs):
        f = fits[f"{i}->{o}"]
        xs = np.array([acc[m][i] for m in models])
        ys = np.array([acc[m][o] for m in models])
        ax.scatter(_link(xs, link), _link(ys, link), c="#4a7bd0")
        for m, x, y in zip(models, xs, ys):
            ax.annotate(m, (_link(x, link), _link(y, link)), fontsize=7)
        grid = np.linspace(_link(max(xs.min() - 0.05, 0.01), link), _link(min(xs.max() + 0.05, 0.99), link), 50)
        ax.plot(grid, f["a"] * grid + f["b"], "k--", lw=0.8)
        ticks = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
        ax.set_xticks(_link(ticks, link), [f"{t:.1f}" for t in ticks])
        ax.set_yticks(_link(ticks, link), [f"{t:.1f}" for t in ticks])
        ax.set_xlabel(f"{i} accuracy ({link} scale)")
        ax.set_ylabel(f"{o} accuracy")
        ax.set_title(f"{o} vs {i}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
