"""The audit card (`unparrot audit`) as one self-contained HTML page, and the page comparing several cards.

A card shows each measurement with its 95% interval and chance floor, a plot per measurement, the
attacks that flipped the prediction, the words read best, and the Parrot paper's published Sync scores
beside ours as published figures (their fonts and vocabulary differ from the card's).
"""

from __future__ import annotations

import math
import time

import numpy as np

from .html import Section, esc, fig_tag, grid, page, table

# Lin et al., "Parrot Captions Teach CLIP to Spot Text" (ECCV 2024): Sync score of ViT-B models.
PUBLISHED_SYNC = (
    ("debiased 100M (Parrot paper)", 0.163),
    ("DataComp medium", 0.268),
    ("OpenAI CLIP (WIT-400M)", 0.317),
    ("DataComp large", 0.338),
    ("OpenCLIP LAION-2B", 0.368),
)
CAVEAT = (
    "Published figures, from the paper's own renderings (its fonts, its 1-gram vocabulary); this card's fonts "
    "(DejaVu) and vocabulary differ, so compare a real checkpoint's score with them only roughly. A small model "
    "trained from scratch has cosines on another scale: read its gap, not its raw score."
)
LIMITS = (
    "What the card cannot tell: why a model reads (the data, the captions or the architecture); how it behaves "
    "on text in natural photos (the renderings are plain backgrounds, the attack one word in red); whether a "
    "high word-reading score hurts a given task (reading is sometimes wanted). An interval covers the sampling of "
    "words, images and pairs, not the choice of fonts or of the vocabulary."
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _v(x, digits=3) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(m: dict, key: str, digits=3) -> str:
    ci = m.get(f"{key}_ci95")
    return f"[{_v(ci[0], digits)}, {_v(ci[1], digits)}]" if ci else ""


def _errbar(ax, labels, values, cis, title, chance=None, color="#4a7bd0"):
    v = np.array([np.nan if x is None else x for x in values], float)
    lo = np.array([c[0] if c else np.nan for c in cis], float)
    hi = np.array([c[1] if c else np.nan for c in cis], float)
    ax.bar(range(len(v)), v, color=color)
    err = [np.clip(np.nan_to_num(v - lo), 0, None), np.clip(np.nan_to_num(hi - v), 0, None)]
    ax.errorbar(range(len(v)), v, yerr=err, fmt="none", ecolor="#222", capsize=4)
    ax.set_xticks(range(len(v)), labels, rotation=25, ha="right", fontsize=8)
    if chance is not None:
        ax.axhline(chance, color="#c0392b", ls="--", lw=1, label=f"chance {chance:.3f}")
        ax.legend(fontsize=8)
    ax.set_title(title)


def _measure_rows(m: dict, measures: list[tuple[str, str]], digits: int) -> list[list[str]]:
    """Table rows (label, value, its 95% interval) of the card's metrics, one per (label, key)."""
    return [[label, _v(m[k], digits), _ci(m, k, digits)] for label, k in measures]


def _sync_section(rec: dict, media: dict) -> Section:
    plt = _plt()
    m = rec["metrics"]
    rows = _measure_rows(
        m,
        [
            ("Sync score (mean cosine, rendering and its word)", "sync_mean"),
            ("Sync std", "sync_std"),
            ("mismatched mean (another word)", "mismatched_mean"),
            ("Sync gap (matched - mismatched)", "sync_gap"),
        ],
        digits=4,
    )
    body = [table(["measure", "value", "95% interval"], rows)]
    body.append(
        f"<p class='note'>{m['n_words']} words x {m['n_renders'] // max(1, m['n_words'])} renderings "
        f"({m['font_px']} px on {m['canvas']} px), {m['n_derangements']} derangements; intervals resample "
        "words.</p>"
    )
    figs = []
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.hist(media["matched"], bins=30, alpha=0.6, label="matched (its own word)", color="#c0392b")
    ax.hist(media["mismatched"], bins=30, alpha=0.6, label="mismatched (other words)", color="#4a7bd0")
    ax.set_xlabel("cosine")
    ax.set_title("Sync: rendering vs text embedding")
    ax.legend(fontsize=8)
    figs.append(fig_tag(fig, "sync histogram"))
    fig, ax = plt.subplots(figsize=(5.4, 3.4))
    names = [n for n, _ in PUBLISHED_SYNC] + ["this model"]
    vals = [v for _, v in PUBLISHED_SYNC] + [m["sync_mean"]]
    ax.barh(range(len(vals)), vals, color=["#999"] * len(PUBLISHED_SYNC) + ["#c0392b"])
    lo, hi = m["sync_mean_ci95"]
    err = [[max(0.0, m["sync_mean"] - lo)], [max(0.0, hi - m["sync_mean"])]]
    ax.errorbar([m["sync_mean"]], [len(vals) - 1], xerr=err, fmt="none", ecolor="#222", capsize=4)
    ax.set_yticks(range(len(vals)), names, fontsize=8)
    ax.set_title("Sync score beside the published ones (grey)")
    figs.append(fig_tag(fig, "sync published"))
    body.append(f'<div class="figs">{"".join(figs)}</div>')
    body.append("<h3>Published Sync scores (Parrot paper, ViT-B)</h3>")
    body.append(table(["model", "Sync score"], [[n, f"{v:.3f}"] for n, v in PUBLISHED_SYNC]))
    body.append(f"<p class='note'>{esc(CAVEAT)}</p>")
    body.append("<h3>Sample renderings</h3>" + grid([(im, "") for im in media["sample_renders"]]))
    return Section("sync", "Sync score", "".join(body))


def _reading_section(rec: dict, media: dict) -> Section:
    plt = _plt()
    m = rec["metrics"]
    body = [
        table(
            ["measure", "value", "95% interval", "chance"],
            [
                [
                    "word reading top-1 (among the vocabulary)",
                    _v(m["read_top1"]),
                    _ci(m, "read_top1"),
                    _v(m["chance"], 4),
                ]
            ],
        )
    ]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    styles = list(m.get("per_style", {}))
    _errbar(
        ax,
        styles,
        [m["per_style"][s] for s in styles],
        [None] * len(styles),
        "read top-1 per colour style",
        chance=m["chance"],
    )
    body.append(f'<div class="figs">{fig_tag(fig, "reading per style")}</div>')
    cells = [
        (im, f"<b>{esc(w)}</b> read {100 * share:.0f}%<br><span class='note'>margin {margin:+.3f}</span>")
        for im, w, margin, share in media["best_read"]
    ]
    body.append("<h3>Words read best (largest margin over the next word)</h3>" + grid(cells))
    return Section("reading", "Word reading", "".join(body))


def _attack_section(rec: dict, media: dict) -> Section:
    plt = _plt()
    m = rec["metrics"]
    keys = [
        ("clean_acc1", "clean accuracy"),
        ("attacked_acc1", "attacked accuracy (wrong class written)"),
        ("control_acc1", "control accuracy (non-class word written)"),
        ("attack_success_rate", "attack success (prediction = written class)"),
    ]
    rows = [[label, _v(m[k]), _ci(m, k), _v(m["chance"])] for k, label in keys]
    body = [table(["measure", "value", "95% interval", "chance floor"], rows)]
    body.append(
        f"<p class='note'>{m['n_images']} images of {esc(rec['dataset'])}, {m['n_classes']} classes; "
        f"wrong class: {esc(m.get('attack_target', ''))}; intervals resample images.</p>"
    )
    fig, ax = plt.subplots(figsize=(5.4, 3.4))
    _errbar(
        ax,
        ["clean", "attacked", "control", "attack success"],
        [m[k] for k, _ in keys],
        [m.get(f"{k}_ci95") for k, _ in keys],
        "Typographic attack",
        chance=m["chance"],
    )
    body.append(f'<div class="figs">{fig_tag(fig, "attack")}</div>')
    cells = []
    for clean, att, truth, written in media["flipped"]:
        cells.append((clean, f"clean: <b>{esc(truth)}</b> (right)"))
        cells.append((att, f"attacked: read as <b>{esc(written)}</b>"))
    body.append(
        f"<h3>Attacks that flipped the prediction ({len(media['flipped'])} shown)</h3>"
        + (grid(cells) if cells else "<p class='note'>none: no attack turned a right answer into the written class</p>")
    )
    return Section("attack", "Typographic attack", "".join(body))


def _reliance_section(rec: dict, media: dict) -> Section:
    plt = _plt()
    m = rec["metrics"]
    rows = _measure_rows(
        m,
        [
            ("CLIP score (image, caption)", "clip_score"),
            ("CLIP score, text masked", "masked_clip_score"),
            ("score drop when masked", "score_drop"),
        ],
        digits=4,
    )
    rows += [
        ["share of text-bearing pairs carried by their text", _v(m["carried_share"]), _ci(m, "carried_share")],
        ["... of all pairs of the pool", _v(m["carried_share_of_pool"]), ""],
    ]
    body = [table(["measure", "value", "95% interval"], rows)]
    body.append(
        f"<p class='note'>{m['n_pairs']} text-bearing pairs of {esc(rec['dataset'])} "
        f"({100 * m['share_with_text_pool']:.1f}% of the pool carries text). Carried: masking the text "
        f"takes more than {100 * m['carried_fraction']:.0f}% of the pair's score above an unrelated caption "
        f"({m['mismatched_clip_score']:.4f}).</p>"
    )
    r = media["reliance"]
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.scatter(r["score"], r["masked"], s=6, alpha=0.4, color="#c0392b")
    lo, hi = float(min(r["score"].min(), r["masked"].min())), float(max(r["score"].max(), r["masked"].max()))
    ax.plot([lo, hi], [lo, hi], color="#444", lw=1)
    b, f = r["baseline"], m["carried_fraction"]
    xs = np.linspace(max(lo, b), hi, 20)
    ax.plot(xs, b + f * (xs - b), color="#4a7bd0", ls="--", lw=1, label="carried below this line")
    ax.set_xlabel("CLIP score")
    ax.set_ylabel("masked CLIP score")
    ax.legend(fontsize=8)
    ax.set_title("Text reliance")
    body.append(f'<div class="figs">{fig_tag(fig, "reliance")}</div>')
    return Section("reliance", "Text reliance on the pool", "".join(body))


def _summary_rows(records: list[dict]) -> list[list[str]]:
    from ..evaluate.audit import HEADLINE

    by = {r["task"]: r["metrics"] for r in records}
    rows = []
    for task, key, label in HEADLINE:
        m = by.get(task)
        if m is None or key not in m:
            continue
        chance = m.get("chance") if task in ("word_reading", "typographic_attack") else None
        rows.append([label, _v(m[key], 4), _ci(m, key, 4), _v(chance)])
    return rows


def card_html(records: list[dict], media: dict) -> str:
    """The card of one model: the summary, then a section per measurement."""
    first = records[0]
    by = {r["task"]: r for r in records}
    head = (
        f"<p>Architecture <code>{esc(first['architecture'])}</code>, checkpoint "
        f"<code>{esc(first['pretrained'] or 'none (random weights)')}</code>. A model that reads instead of "
        "seeing has a high Sync gap and word reading, and a high attack success with a control accuracy close "
        "to the clean one (the class name, not any text, moves it).</p>"
    )
    body = head + table(["measure", "value", "95% interval", "chance"], _summary_rows(records))
    t = first.get("timing", {})
    body += (
        f"<p class='note'>{t.get('images', 0)} images in {t.get('total_s', 0):.1f} s "
        f"({t.get('images_per_s', 0):.1f} images/s on {esc(first['audit'].get('device', ''))}); "
        f"{first['audit']['bootstrap']} bootstrap resamples, seed {first['audit']['seed']}.</p>"
        f"<p class='note'>{esc(LIMITS)}</p>"
    )
    sections = [
        Section("summary", "Summary", body),
        _sync_section(by["sync"], media),
        _reading_section(by["word_reading"], media),
        _attack_section(by["typographic_attack"], media),
    ]
    if "text_reliance" in by:
        sections.append(_reliance_section(by["text_reliance"], media))
    return page(f"unparrot audit: {first['model']}", sections, f"text-bias card - {time.strftime('%Y-%m-%d %H:%M')}")


def comparison_html(cards: list[list[dict]]) -> str:
    """Several cards side by side: the headline numbers with intervals, one plot per measurement, links."""
    from ..evaluate.audit import HEADLINE

    plt = _plt()
    names = [c[0]["model"] for c in cards]
    bys = [{r["task"]: r["metrics"] for r in c} for c in cards]
    present = [(t, k, lab) for t, k, lab in HEADLINE if any(t in b and k in b[t] for b in bys)]
    header = ["model"] + [lab for _, _, lab in present] + ["card"]
    rows = []
    for n, b in zip(names, bys):
        cells = [n]
        for t, k, _ in present:
            m = b.get(t, {})
            cells.append(f"{_v(m.get(k))} {_ci(m, k)}" if k in m else "")
        cells.append(f"{n}/card.html")
        rows.append(cells)
    tab = table(header, rows)
    for n in names:  # the card column as links (table() escapes its cells)
        tab = tab.replace(f"<td>{esc(n)}/card.html</td>", f"<td><a href='{esc(n)}/card.html'>card</a></td>")
    figs = []
    for t, k, lab in present:
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        chance = (
            next((b[t].get("chance") for b in bys if t in b), None)
            if t in ("word_reading", "typographic_attack")
            else None
        )
        _errbar(
            ax,
            names,
            [b.get(t, {}).get(k) for b in bys],
            [b.get(t, {}).get(f"{k}_ci95") for b in bys],
            lab,
            chance=chance,
        )
        figs.append(fig_tag(fig, lab))
    body = (
        tab
        + f"<p class='note'>Values with 95% bootstrap intervals. {esc(CAVEAT)}</p>"
        + f'<div class="figs">{"".join(figs)}</div>'
    )
    return page(
        "unparrot audit: comparison",
        [Section("comparison", "Models compared", body)],
        f"{len(cards)} cards - {time.strftime('%Y-%m-%d %H:%M')}",
    )
