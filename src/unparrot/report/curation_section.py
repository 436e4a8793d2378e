"""Report sections of the curation stages: CLIP scores, clusters, recipe funnels and what each removed."""

from __future__ import annotations

import json

import numpy as np

from ..pool import read_subset, subset_contains
from .html import Section, draw_boxes, esc, fig_tag, grid, table
from .profile_section import fetch_samples


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def clip_section(ctx) -> Section | None:
    pool, embed = ctx.pool, ctx.options.get("embed_stage", "embed")
    if not pool.done_shards(embed):
        return None
    plt = _plt()
    stages = [embed] + [s for s in ("spot", "parrot") if pool.done_shards(s)]
    cols = ["clip_score", "masked_clip_score", "has_text", "cotr"]
    df = pool.load(stages, columns=[c for c in cols if c in _all_columns(pool, stages)], how="inner")
    body, figs = [], []
    has = df["has_text"].astype(bool).to_numpy() if "has_text" in df else None
    rows = [["samples scored", len(df)], ["mean CLIP score", f"{df['clip_score'].mean():.4f}"]]
    if has is not None:
        rows += [
            ["mean CLIP score, images with text", f"{df['clip_score'][has].mean():.4f}"],
            ["mean CLIP score, images without text", f"{df['clip_score'][~has].mean():.4f}"],
        ]
    if "masked_clip_score" in df:
        rows.append(["mean masked CLIP score", f"{df['masked_clip_score'].mean():.4f}"])
    body.append(table(["measure", "value"], rows))
    if "cotr" in df:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.scatter(df["cotr"], df["clip_score"], s=5, alpha=0.3)
        ax.set_xlabel("CoTR")
        ax.set_ylabel("CLIP score")
        ax.set_title("CLIP score against CoTR")
        figs.append(fig_tag(fig, "clip vs cotr"))
    if "masked_clip_score" in df:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        c = np.where(has, "#c0392b", "#4a7bd0") if has is not None else "#4a7bd0"
        ax.scatter(df["clip_score"], df["masked_clip_score"], s=5, alpha=0.3, c=c)
        lo, hi = float(df["clip_score"].min()), float(df["clip_score"].max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel("CLIP score")
        ax.set_ylabel("masked CLIP score")
        ax.set_title("masked against unmasked (red: images with text)")
        figs.append(fig_tag(fig, "masked vs unmasked"))
    if has is not None:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.hist(
            [df["clip_score"][~has], df["clip_score"][has]],
            bins=30,
            label=["no text", "text"],
            color=["#4a7bd0", "#c0392b"],
            alpha=0.8,
        )
        ax.legend()
        ax.set_xlabel("CLIP score")
        ax.set_title("CLIP score by text presence")
        figs.append(fig_tag(fig, "clip score hist"))
    body.append(f'<div class="figs">{"".join(figs)}</div>')
    return Section("clip", "CLIP scores", "".join(body))


def _all_columns(pool, stages) -> set:
    import pyarrow.parquet as pq

    return {n for st in stages for n in pq.read_schema(pool.column_path(st, pool.done_shards(st)[0])).names}


def cluster_section(ctx) -> Section | None:
    pool, stage = ctx.pool, ctx.options.get("cluster_stage", "cluster")
    if not pool.done_shards(stage):
        return None
    plt = _plt()
    df = pool.load(stage, columns=["cluster", "keep_dedup"])
    sizes = np.bincount(df["cluster"].to_numpy())
    info = (pool.stage_info(stage) or {}).get("params", {})
    body = [
        table(
            ["measure", "value"],
            [
                ["samples", len(df)],
                ["clusters", len(sizes)],
                ["median / largest cluster", f"{int(np.median(sizes))} / {sizes.max()}"],
                ["near-duplicates dropped (SemDeDup)", f"{int((~df['keep_dedup']).sum())} (eps {info.get('eps')})"],
            ],
        )
    ]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(sizes, bins=30, color="#4a7bd0", edgecolor="white")
    ax.set_xlabel("cluster size")
    ax.set_ylabel("clusters")
    ax.set_title("cluster sizes")
    body.append(fig_tag(fig, "cluster sizes"))
    return Section("clusters", "Clusters and near-duplicates", "".join(body))


def funnel_section(ctx) -> Section | None:
    pool = ctx.pool
    d = pool.root / "subsets"
    stats = {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))} if d.exists() else {}
    stats = {k: v for k, v in stats.items() if "funnel" in v}
    if not stats:
        return None
    body = ["<p class='note'>Each row of a funnel is a condition of the recipe, applied in order.</p>"]
    summary = []
    for name, s in stats.items():
        summary.append(
            [
                name,
                s["kept"],
                f"{100 * s['kept'] / max(1, s['pool_rows']):.1f}%",
                f"{100 * s['share_with_text_subset']:.1f}%" if "share_with_text_subset" in s else "",
                f"{100 * s['share_with_text_pool']:.1f}%" if "share_with_text_pool" in s else "",
            ]
        )
    body.append(table(["subset", "kept", "of pool", "with text (subset)", "with text (pool)"], summary))
    for name, s in stats.items():
        rows = [[f["step"], f["before"], f["removed"], f["after"]] + ([f.get("skipped", "")]) for f in s["funnel"]]
        body.append(f"<h3>{esc(name)}</h3><p class='note'>{esc(s.get('description', ''))}</p>")
        body.append(table(["step", "before", "removed", "after", "note"], rows) if rows else "<p>no conditions</p>")
    body.append(_removed_grids(ctx, list(stats)))
    return Section("funnel", "Selection funnels", "".join(body))


def _removed_grids(ctx, names) -> str:
    pool = ctx.pool
    spot = pool.done_shards("spot")
    base = pool.load("spot", columns=["boxes", "texts", "has_text"]) if spot else None
    if base is None:
        return ""
    rng = np.random.default_rng(0)
    picks = {}
    for name in names:
        p = pool.subset_path(name)
        if not p.exists():
            continue
        inside = subset_contains(read_subset(p), base["uid"].tolist())
        removed = base[~inside]
        if len(removed):
            picks[name] = removed.iloc[rng.permutation(len(removed))[:8]]
    if not picks:
        return ""
    samples = fetch_samples(pool, [r for g in picks.values() for r in g[["uid", "shard"]].to_dict("records")])
    out = ["<h3>What each recipe removed (random examples)</h3>"]
    for name, g in picks.items():
        cells = []
        for r in g.to_dict("records"):
            im, cap = samples.get(r["uid"], (None, ""))
            if im is not None:
                cells.append((draw_boxes(im, r["boxes"], r["texts"]), esc(cap)[:80]))
        out.append(f"<h3>{esc(name)}</h3>" + grid(cells))
    return "".join(out)
