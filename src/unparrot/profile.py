"""`unparrot profile` and `unparrot vocab`: how much of a pool carries text and how much its captions parrot.

`profile` runs the spot and parrot stages (either engine) and summarises their columns;
`vocab` counts caption 1-grams and 2-grams and co-embedded 1-grams (the Parrot paper's vocabularies,
reused by the Sync score).
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .engine import run
from .flags import key_values, option
from .ops.spot import SpotConfig
from .pool import Pool
from .cotr import STOPWORDS, tokens


@dataclass
class ProfileSummary:
    samples: int
    errors: int
    share_with_text: float
    mean_cotr: float
    mean_cotr_text_images: float
    share_parrot: float
    share_fully_parroted: float
    mean_text_area: float
    top_co_emb: list = field(default_factory=list)
    stage_lines: list = field(default_factory=list)

    def line(self) -> str:
        top = ", ".join(f"{w} ({c})" for w, c in self.top_co_emb[:10])
        return "\n".join(
            self.stage_lines
            + [
                f"profile: {self.samples} samples ({self.errors} errors)",
                f"  images with text                   {100 * self.share_with_text:5.1f}%",
                f"  mean CoTR (all / images with text) {self.mean_cotr:.3f} / {self.mean_cotr_text_images:.3f}",
                f"  captions with CoTR > 0             {100 * self.share_parrot:5.1f}%",
                f"  fully parroted captions (CoTR = 1) {100 * self.share_fully_parroted:5.1f}%",
                f"  mean text area (images with text)  {100 * self.mean_text_area:5.1f}% of the image",
                f"  top co-embedded words              {top}",
            ]
        )


def summarize(
    pool: Pool | str, spot_stage: str = "spot", parrot_stage: str = "parrot", top: int = 20
) -> ProfileSummary:
    """The profile numbers from existing spot and parrot columns."""
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    df = pool.load([spot_stage, parrot_stage], columns=["has_text", "text_area", "cotr", "co_emb"], how="inner")
    n = len(df)
    # a sample spot cannot read is an error row in parrot too ("no 'spot' output"): count samples, not rows
    errors = len(
        {
            (r.shard, r.key)
            for st in (spot_stage, parrot_stage)
            for r in pool.errors(st).dropna(subset=["uid"]).itertuples()
        }
    )
    has = df["has_text"].astype(bool).to_numpy() if n else np.zeros(0, bool)
    cotr = df["cotr"].astype(float).to_numpy() if n else np.zeros(0)
    co = Counter(w for ws in df["co_emb"] for w in (ws if ws is not None else ()))
    return ProfileSummary(
        samples=n,
        errors=errors,
        share_with_text=float(has.mean()) if n else 0.0,
        mean_cotr=float(cotr.mean()) if n else 0.0,
        mean_cotr_text_images=float(cotr[has].mean()) if has.any() else 0.0,
        share_parrot=float((cotr > 0).mean()) if n else 0.0,
        share_fully_parroted=float((cotr >= 1.0).mean()) if n else 0.0,
        mean_text_area=float(df["text_area"].to_numpy()[has].mean()) if has.any() else 0.0,
        top_co_emb=co.most_common(top),
    )


@dataclass
class ProfileConfig:
    """The options of `profile()` (its signature defaults read these; so do the spot and parrot commands'
    batch size and workers). The engine options are EngineConfig's."""

    backend: str = option(SpotConfig.backend, "OCR backend: rapidocr, oracle or module:Class")
    workers: int = option(2, "operator copies working on shards at once (local: processes; ray: actors)")
    batch_size: int = option(32, "samples per spot call")
    spot_params: dict | None = key_values("spot operator option (repeatable)", aliases=("--spot-param",))
    parrot_params: dict | None = key_values(
        "CoTR variant: stopwords=true, min_len=2, fuzzy=true, keep_non_latin=true (repeatable)",
        aliases=("--parrot-param",),
    )
    spot_stage: str = option("spot", "spot stage name")
    parrot_stage: str = option("parrot", "parrot stage name")
    overwrite: bool = option(False, "recompute stages made with other parameters")


def profile(
    pool: Pool | str,
    backend: str = ProfileConfig.backend,
    workers: int = ProfileConfig.workers,
    batch_size: int = ProfileConfig.batch_size,
    spot_params: dict | None = ProfileConfig.spot_params,
    parrot_params: dict | None = ProfileConfig.parrot_params,
    spot_stage: str = ProfileConfig.spot_stage,
    parrot_stage: str = ProfileConfig.parrot_stage,
    overwrite: bool = ProfileConfig.overwrite,
    progress: bool = True,
    **engine,
) -> ProfileSummary:
    """Run text spotting and the parrot metrics over a pool (resumable) and summarise them.

    `engine`: `run()`'s engine options (engine="ray", address, num_cpus, num_gpus, threads), both stages."""
    sp = {"backend": backend, **(spot_params or {})}
    pp = {"spot_stage": spot_stage, **(parrot_params or {})}
    s1 = run(
        pool,
        "spot",
        sp,
        stage=spot_stage,
        workers=workers,
        batch_size=batch_size,
        overwrite=overwrite,
        progress=progress,
        **engine,
    )
    s2 = run(
        pool,
        "parrot",
        pp,
        stage=parrot_stage,
        workers=workers,
        batch_size=256,
        overwrite=overwrite,
        progress=progress,
        **engine,
    )
    out = summarize(pool, spot_stage, parrot_stage)
    out.stage_lines = [s1.line(), s2.line()]
    return out


@dataclass
class InfoConfig:
    """The options of `pool_info()` (its signature defaults read these; `unparrot info`'s flags too)."""

    truth: bool = option(False, "also the synthetic ground-truth statistics (synth.stats.truth_stats)")


def pool_info(pool: Pool | str, truth: bool = InfoConfig.truth) -> dict:
    """A pool at a glance, from its files: shards and samples, each stage's finished shards, rows, errors
    and operator, each subset's size (and with `truth`, the synthetic ground truth's statistics)."""
    from .engine.stage import stage_counts
    from .io.sizes import shard_samples

    pool = pool if isinstance(pool, Pool) else Pool(pool)
    shards = pool.shards()
    ids = [s.id for s in shards]
    stages = {}
    for st in pool.stages():
        c = stage_counts(pool, st, ids)
        stages[st] = {
            "done_shards": len(pool.done_shards(st)),
            "rows": c["n_ok"],
            "errors": c["n_err"],
            "op": (pool.stage_info(st) or {}).get("op", "?"),
        }
    subset_files = sorted((pool.root / "subsets").glob("*.npy")) if (pool.root / "subsets").exists() else []
    subsets = {p.stem: len(np.load(p, mmap_mode="r")) for p in subset_files}
    out = {
        "root": str(pool.root),
        "shards": len(shards),
        "samples": sum(shard_samples(s.path) for s in shards),
        "stages": stages,
        "subsets": subsets,
    }
    if truth:
        from .synth.stats import truth_stats

        out["truth"] = truth_stats(pool)
    return out


# header row of each vocabulary layout: unparrot's, and the Parrot paper's (pandas' `Series.to_csv` of
# word counts: the words are the unnamed index column, which its loader reads back as `Unnamed: 0`)
VOCAB_HEADERS = {"unparrot": ["ngram", "count"], "parrot": ["", "count"]}


@dataclass
class VocabConfig:
    """The options of `vocab()` (its signature defaults read these; the CLI's flags are made from them)."""

    out: str | None = option(None, "output folder (default POOL/vocab)")
    top: int = option(1000, "n-grams kept per file (the most frequent)")
    stopwords: bool = option(False, "drop stop words")
    min_len: int = option(1, "drop tokens shorter than this")
    parrot_stage: str = option("parrot", "stage with the co-embedded words")
    format: str = option(
        "unparrot",
        "CSV layout: unparrot (header ngram,count) or parrot (the Parrot paper's pandas layout, header ,count)",
        choices=tuple(VOCAB_HEADERS),
    )


def vocab(
    pool: Pool | str,
    out: str | os.PathLike | None = VocabConfig.out,
    top: int = VocabConfig.top,
    stopwords: bool = VocabConfig.stopwords,
    min_len: int = VocabConfig.min_len,
    parrot_stage: str = VocabConfig.parrot_stage,
    format: str = VocabConfig.format,
) -> dict[str, list[tuple[str, int]]]:
    """Caption 1-gram and 2-gram counts and co-embedded 1-gram counts (top `top` of each).

    Written to `out/` (default POOL/vocab/) as caption_1gram.csv, caption_2gram.csv and co_emb_1gram.csv,
    with the header `ngram,count` (`format="unparrot"`) or `,count` (`format="parrot"`: the Parrot
    paper's files, which its `sys_benchmark.py` reads with pandas as column `Unnamed: 0`). Co-emb counts
    need the parrot stage; without it that file is skipped.
    """
    if format not in VOCAB_HEADERS:
        raise ValueError(f"unknown vocabulary format {format!r}; one of {', '.join(VOCAB_HEADERS)}")
    pool = pool if isinstance(pool, Pool) else Pool(pool)

    def keep(t: str) -> bool:
        return len(t) >= min_len and not (stopwords and t in STOPWORDS)

    c1, c2 = Counter(), Counter()
    for row in pool.samples():
        if row["caption"] is None:
            continue
        toks = [t for t in tokens(row["caption"]) if keep(t)]
        c1.update(toks)
        c2.update(f"{a} {b}" for a, b in zip(toks, toks[1:]))
    result = {"caption_1gram": c1.most_common(top), "caption_2gram": c2.most_common(top)}
    if pool.done_shards(parrot_stage):
        co = Counter(
            w for ws in pool.load(parrot_stage, columns=["co_emb"])["co_emb"] if ws is not None for w in ws if keep(w)
        )
        result["co_emb_1gram"] = co.most_common(top)
    out = Path(out) if out else pool.root / "vocab"
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in result.items():
        with open(out / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(VOCAB_HEADERS[format])
            w.writerows(rows)
    return result


def read_vocab(path: str | os.PathLike, top: int | None = None) -> list[str]:
    """The n-grams of a vocabulary file (first column), in file order (most frequent first).

    Reads unparrot's CSVs (header `ngram,count`), the Parrot paper's (pandas' layout: header `,count`,
    or `Unnamed: 0,count` after a pandas round trip), headerless `word,count` rows and one word per line.
    The first row is a header when its first cell is empty, `ngram` or `Unnamed: 0`, or its second cell is
    not a count; empty words are skipped."""
    words = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f)):
            if i == 0 and row and _vocab_header(row):
                continue
            if not row or not row[0].strip():
                continue
            words.append(row[0])
            if top and len(words) >= top:
                break
    return words


def _vocab_header(row: list[str]) -> bool:
    if row[0].strip() in ("", "ngram", "Unnamed: 0"):
        return True
    if len(row) < 2:
        return False
    try:
        float(row[1])
    except ValueError:
        return True
    return False
