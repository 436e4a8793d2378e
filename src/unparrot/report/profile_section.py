"""The profile section: text statistics, their distributions and example images with OCR boxes."""

from __future__ import annotations

import numpy as np

from ..imaging.decode import open_image
from .html import Section, draw_boxes, esc, fig_tag, grid, table


def fetch_samples(pool, rows, max_side: int = 512) -> dict:
    """uid -> (PIL image or None, caption) for a few rows (each with `uid` and `shard`); reads only the
    shards involved, once."""
    want: dict[str, set] = {}
    for r in rows:
        want.setdefault(r["shard"], set()).add(r["uid"])
    out = {}
    for row in pool.samples([s for s in pool.shards() if s.id in want]):
        if row["uid"] in want.get(row["shard"], ()):
            try:
                im = open_image(row["image"], draft=max_side)
            except Exception:  # noqa: BLE001 - the report shows what it can
                im = None
            out[row["uid"]] = (im, row["caption"] or "")
    return out


def _hist(ax, values, bins, title, xlabel):
    ax.hist(values, bins=bins, color="#4a7bd0", edgecolor="white")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")


def profile_section(ctx) -> Section | None:
    from ..profile import summarize

    pool = ctx.pool
    spot, parrot = ctx.options.get("spot_stage", "spot"), ctx.options.get("parrot_stage", "parrot")
    if not pool.done_shards(spot) or not pool.done_shards(parrot):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(pool, spot, parrot)
    df = pool.load(
        [spot, parrot], columns=["has_text", "text_area", "n_text", "boxes", "texts", "cotr", "co_emb"], how="inner"
    )
    ctx.cache["profile_df"] = df
    body = [
        table(
            ["measure", "value"],
            [
                ["samples profiled", s.samples],
                ["errors (decode, OCR)", s.errors],
                ["images with text", f"{100 * s.share_with_text:.1f}%"],
                ["mean CoTR (all samples)", f"{s.mean_cotr:.3f}"],
                ["mean CoTR (images with text)", f"{s.mean_cotr_text_images:.3f}"],
                ["captions with CoTR > 0", f"{100 * s.share_parrot:.1f}%"],
                ["fully parroted captions (CoTR = 1)", f"{100 * s.share_fully_parroted:.1f}%"],
                ["mean text area of images with text", f"{100 * s.mean_text_area:.1f}%"],
            ],
        )
    ]
    has = df["has_text"].astype(bool).to_numpy()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    _hist(axes[0], df["text_area"].to_numpy()[has], 30, "text area (images with text)", "share of the image")
    _hist(axes[1], df["cotr"].to_numpy(), 20, "CoTR", "caption tokens spelled in the image")
    _hist(
        axes[2],
        df["n_text"].to_numpy(),
        np.arange(0, max(2, int(df["n_text"].max()) + 2)) - 0.5,
        "text instances per image",
        "n_text",
    )
    figs = [fig_tag(fig, "histograms")]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.scatter(df["text_area"].to_numpy()[has], df["cotr"].to_numpy()[has], s=6, alpha=0.35, color="#c0392b")
    ax.set_xlabel("text area")
    ax.set_ylabel("CoTR")
    ax.set_title("CoTR against text area (images with text)")
    figs.append(fig_tag(fig, "cotr vs text area"))
    body.append(f'<div class="figs">{"".join(figs)}</div>')
    body.append("<h3>Top co-embedded words</h3>")
    body.append(table(["word", "occurrences in captions"], s.top_co_emb[:20]))
    rng = np.random.default_rng(0)
    groups = [
        ("High CoTR (caption spells the image text)", df[df["cotr"] >= 0.5]),
        ("Text in the image, caption does not parrot it", df[has & (df["cotr"] == 0)]),
        ("No text found", df[~has]),
    ]
    picks = {name: g.iloc[rng.permutation(len(g))[:12]] for name, g in groups}
    samples = fetch_samples(pool, [r for g in picks.values() for r in g[["uid", "shard"]].to_dict("records")])
    for name, g in picks.items():
        cells = []
        for r in g.to_dict("records"):
            im, caption = samples.get(r["uid"], (None, ""))
            if im is None:
                continue
            cap = (
                f"<b>CoTR {r['cotr']:.2f}</b> {esc(caption)[:90]}"
                f"<br><span class='note'>read: {esc(', '.join([] if r['texts'] is None else r['texts']))[:60]}</span>"
            )
            cells.append((draw_boxes(im, r["boxes"], r["texts"]), cap))
        body.append(f"<h3>{esc(name)} ({len(g)} shown)</h3>" + (grid(cells) if cells else "<p class='note'>none</p>"))
    return Section("profile", "Profile: embedded text and parrot captions", "".join(body))
