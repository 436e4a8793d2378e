"""Effective robustness across models (Fang et al., docs/methods.md §5) from zero-shot result files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..flags import comma_list, option
from .metrics import link_fn, effective_robustness, fit_trend
from .results import ResultsConfig, read_results, write_result


def accuracy_table(out: str | os.PathLike) -> dict[str, dict[str, float]]:
    """model -> dataset -> zero-shot top-1 accuracy."""
    acc: dict[str, dict[str, float]] = {}
    for r in read_results(out):
        if r["task"] == "zeroshot":
            acc.setdefault(r["model"], {})[r["dataset"]] = r["metrics"]["acc1"]
    return acc


@dataclass(kw_only=True)
class RobustnessConfig:
    """The options of `robustness()` (its signature defaults read these; the CLI's flags too)."""

    out: str = option(ResultsConfig.out, "results folder", positional=True)
    id_sets: tuple = option(
        help="in-distribution set name(s), comma separated",
        item=comma_list,
        convert=list,
        metavar="A,B",
        aliases=("--id",),
    )
    ood_sets: tuple = option(
        help="shifted set names, comma separated", item=comma_list, convert=list, metavar="A,B", aliases=("--ood",)
    )
    baselines: tuple | None = option(
        None,
        "models defining the trend, comma separated: a separate family (Fang et al.)",
        item=comma_list,
        convert=list,
        metavar="A,B",
    )
    link: str = option("logit", "logit, probit or linear")
    models: tuple | None = option(
        None, "models to score, comma separated (default: all)", item=comma_list, convert=list, metavar="A,B"
    )
    plot: str | None = option(None, "write a PNG of the fits")
    score_baselines: bool = option(
        False,
        "also score baseline models (their ER is fitted, ~0 by construction); "
        "with no --baselines, fit the line through every model",
    )
    band_boot: int = option(500, "bootstrap resamples of the trend band")


def robustness(
    out: str | os.PathLike,
    id_sets: list[str],
    ood_sets: list[str],
    baselines: list[str] | None = RobustnessConfig.baselines,
    link: str = RobustnessConfig.link,
    models: list[str] | None = RobustnessConfig.models,
    plot: str | os.PathLike | None = RobustnessConfig.plot,
    score_baselines: bool = RobustnessConfig.score_baselines,
    band_boot: int = RobustnessConfig.band_boot,
) -> dict:
    """Fit link(acc_ood) = a link(acc_id) + b over `baselines` for each (ID, OOD) pair; ER per model and
    shift, averaged over shifts and ID sets. Writes a `robustness` result per scored model.

    Fang et al. fit the line on a separate family of baseline models: a model that is also a baseline has
    ER near zero by construction (least-squares residuals average to zero), so scoring one is refused
    unless `score_baselines` (then `baselines` may be omitted: every model defines the line). `models`
    defaults to every model with results that is not a baseline. The plot shows the family, its line with
    a bootstrap band over the evaluation images (when the per-image outcomes were saved) and the models."""
    acc = accuracy_table(out)
    if baselines is None:
        if not score_baselines:
            raise ValueError(
                "effective robustness needs a baseline family that defines the trend line (baselines=...); "
                "fitting the line through the scored models themselves makes their ER zero on average "
                "(pass score_baselines=True / --score-baselines to do it anyway)"
            )
        baselines = list(models or sorted(acc))
    baselines = list(baselines)
    if models is None:
        models = [m for m in sorted(acc) if m not in baselines] + (baselines if score_baselines else [])
    overlap = [m for m in models if m in baselines]
    if overlap and not score_baselines:
        raise ValueError(
            f"models {overlap} are also baselines: their ER is fitted, not measured "
            "(pass score_baselines=True / --score-baselines to score them anyway)"
        )
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
        band = trend_band(out, baselines, id_sets, ood_sets, link, band_boot)
        plot_robustness(acc, id_sets, ood_sets, fits, link, models, plot, baselines=baselines, band=band)
    return {"fits": fits, "effective_robustness": per, "link": link, "baselines": baselines}


def trend_band(out, baselines, id_sets, ood_sets, link, n_boot: int = 500, confidence: float = 0.95, seed: int = 0):
    """95% band of the baselines' trend line, from refitting it on evaluation images resampled with
    replacement (the same images for every baseline, so their accuracies move together); None when the
    per-image outcomes are missing (results from before they were saved)."""
    from .results import read_outcomes

    correct: dict = {}
    for m in baselines:
        for d in set(id_sets) | set(ood_sets):
            o = read_outcomes(out, m, "zeroshot", d)
            if o is None:
                return None
            correct[(m, d)] = dict(zip(o["key"].tolist(), (o["pred"] == o["label"]).astype(float)))
    band = {}
    rng = np.random.default_rng(seed)
    for i in id_sets:
        for o in ood_sets:
            keys = sorted(set.intersection(*(set(correct[(m, d)]) for m in baselines for d in (i, o))))
            if not keys:
                return None
            X = np.array([[correct[(m, i)][k] for k in keys] for m in baselines])
            Y = np.array([[correct[(m, o)][k] for k in keys] for m in baselines])
            lo_x, hi_x = X.mean(1).min(), X.mean(1).max()
            grid = np.linspace(max(lo_x - 0.05, 0.01), min(hi_x + 0.05, 0.99), 40)
            curves = []
            for _ in range(n_boot):
                idx = rng.integers(len(keys), size=len(keys))
                ax, ay = X[:, idx].mean(1), Y[:, idx].mean(1)
                if np.ptp(link_fn(ax, link)) == 0:
                    continue
                a, b = fit_trend(ax, ay, link)
                curves.append(a * link_fn(grid, link) + b)
            if curves:
                q = (1 - confidence) / 2
                lo, hi = np.quantile(np.array(curves), [q, 1 - q], axis=0)
                band[f"{i}->{o}"] = (grid, lo, hi)
    return band


def plot_robustness(acc, id_sets, ood_sets, fits, link, models, path, baselines=None, band=None):
    """ID vs OOD accuracy on link-scaled axes: the baseline family (grey), its trend line and band, and
    the scored models (labelled), one panel per (ID, OOD) pair (for the report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = [m for m in (baselines or []) if m not in models]
    pairs = [(i, o) for i in id_sets for o in ood_sets]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.8), squeeze=False)
    for ax, (i, o) in zip(axes[0], pairs):
        f = fits[f"{i}->{o}"]
        xs = np.array([acc[m][i] for m in models + baselines])
        if baselines:
            bx = np.array([acc[m][i] for m in baselines])
            by = np.array([acc[m][o] for m in baselines])
            ax.scatter(link_fn(bx, link), link_fn(by, link), c="#999999", s=14, label="baseline family")
        mx = np.array([acc[m][i] for m in models])
        my = np.array([acc[m][o] for m in models])
        ax.scatter(link_fn(mx, link), link_fn(my, link), c="#d04a4a" if baselines else "#4a7bd0", s=24)
        for m, x, y in zip(models, mx, my):
            ax.annotate(m, (link_fn(x, link), link_fn(y, link)), fontsize=7)
        grid = np.linspace(max(xs.min() - 0.05, 0.01), min(xs.max() + 0.05, 0.99), 50)
        ax.plot(link_fn(grid, link), f["a"] * link_fn(grid, link) + f["b"], "k--", lw=0.8)
        if band and f"{i}->{o}" in band:
            g, lo, hi = band[f"{i}->{o}"]
            ax.fill_between(link_fn(g, link), lo, hi, color="#888888", alpha=0.25, lw=0, label="95% band")
        ticks = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
        ax.set_xticks(link_fn(ticks, link), [f"{t:.1f}" for t in ticks])
        ax.set_yticks(link_fn(ticks, link), [f"{t:.1f}" for t in ticks])
        ax.set_xlabel(f"{i} accuracy ({link} scale)")
        ax.set_ylabel(f"{o} accuracy")
        ax.set_title(f"{o} vs {i}")
        if baselines:
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
