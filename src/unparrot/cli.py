"""Command line: one subcommand per public function; each is a thin wrapper that parses, calls, prints."""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml


def _kv(items: list[str] | None) -> dict:
    """--param key=value pairs; values are parsed as YAML scalars/lists (3, 0.5, true, [1, 2])."""
    out = {}
    for it in items or ():
        if "=" not in it:
            raise SystemExit(f"error: --param wants key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


def _print(obj):
    print(obj.line() if hasattr(obj, "line") else json.dumps(obj, indent=1, default=str))


# ---- foundation ---------------------------------------------------------------------------------
def cmd_synth(a):
    from .synth.generate import synth
    from .synth.stats import format_truth_stats, truth_stats

    s = synth(
        a.out,
        n=a.n,
        preset=a.preset,
        seed=a.seed,
        shard_size=a.shard_size,
        eval_per_class=a.eval_per_class,
        workers=a.workers,
        progress=not a.quiet,
        **_kv(a.param),
    )
    print(
        f"synth: {s['samples']} pairs in {s['shards']} shards, {sum(s['eval_sets'].values())} evaluation "
        f"images in {len(s['eval_sets'])} sets ({s['seconds']}s) -> {a.out}"
    )
    if a.stats:
        print(format_truth_stats(truth_stats(a.out)))


def cmd_ingest(a):
    from .io.ingest import ingest

    _print(
        ingest(
            a.source,
            a.pool,
            format=a.format,
            shard_size=a.shard_size,
            image_col=a.image_col,
            caption_col=a.caption_col,
            path_col=a.path_col,
            image_root=a.image_root,
            sep=a.sep,
            caption_fields=tuple(a.caption_fields.split(",")),
            caption_join=a.caption_join,
            progress=not a.quiet,
        )
    )


def _engine_options(a) -> dict:
    """The engine flags of a stage command as `run()` keywords (unset flags: EngineConfig's defaults)."""
    import dataclasses

    from .engine import EngineConfig

    return dataclasses.asdict(config_from_flags(a, EngineConfig))


def _run_op(a, op: str, params: dict, batch_size: int | None = None):
    """The stage commands: an operator over the pool with the engine options and stage name of `a`."""
    from .engine import run

    _print(
        run(
            a.pool,
            op,
            params,
            stage=a.stage,
            batch_size=batch_size or a.batch_size,
            overwrite=a.overwrite,
            progress=not a.quiet,
            **_engine_options(a),
        )
    )


def cmd_run(a):
    _run_op(a, a.op, _kv(a.param))


def cmd_reshard(a):
    from .io.reshard import reshard

    _print(
        reshard(
            a.pool,
            a.subset,
            a.out,
            shard_size=a.shard_size,
            columns=a.columns or None,
            mask_text=a.mask_text,
            mask_fill=a.mask_fill,
            progress=not a.quiet,
            caption_column=a.caption_column,
        )
    )


def cmd_info(a):
    from .pool import Pool
    from .engine.local import stage_counts

    from .io.sizes import shard_samples

    pool = Pool(a.pool)
    shards = pool.shards()
    print(f"pool {pool.root}: {len(shards)} shards, {sum(shard_samples(s.path) for s in shards)} samples")
    for st in pool.stages():
        c = stage_counts(pool, st, [s.id for s in shards])
        info = pool.stage_info(st) or {}
        print(
            f"  {st:<16} {len(pool.done_shards(st))}/{len(shards)} shards, {c['n_ok']} rows, {c['n_err']} errors"
            f"  [{info.get('op', '?')}]"
        )
    subs = sorted((pool.root / "subsets").glob("*.npy")) if (pool.root / "subsets").exists() else []
    for p in subs:
        import numpy as np

        print(f"  subset {p.stem:<12} {len(np.load(p, mmap_mode='r'))} uids")
    if a.truth:
        from .synth.stats import format_truth_stats, truth_stats

        print(format_truth_stats(truth_stats(pool)))


def cmd_verify(a):
    from .verify import verify

    rep = verify(a.pool)
    print(rep.line())
    return 0 if rep.ok else 1


# ---- profiling ----------------------------------------------------------------------------------
def _stage_cmd(op):
    def cmd(a):
        params = _kv(a.param)
        if op == "spot" and a.backend:
            params.setdefault("backend", a.backend)
        _run_op(a, op, params)

    return cmd


def cmd_profile(a):
    from .profile import profile

    spot_params = _kv(a.spot_param)
    for k in ("det_max_side", "det_min_side", "min_score", "min_area", "min_chars"):
        if getattr(a, k) is not None:
            spot_params[k] = getattr(a, k)
    engine = _engine_options(a)
    print(
        profile(
            a.pool,
            backend=a.backend,
            workers=engine.pop("workers"),
            batch_size=a.batch_size,
            spot_params=spot_params,
            parrot_params=_kv(a.parrot_param),
            overwrite=a.overwrite,
            progress=not a.quiet,
            **engine,
        ).line()
    )


def cmd_vocab(a):
    from .profile import vocab

    fmt = {"format": a.format} if a.format else {}  # the default lives in vocab()
    v = vocab(a.pool, out=a.out, top=a.top, stopwords=a.stopwords, min_len=a.min_len, **fmt)
    for name, rows in v.items():
        print(f"{name}: {len(rows)} n-grams; top: " + ", ".join(f"{w} ({c})" for w, c in rows[:8]))
    print(f"written to {a.out or str(a.pool) + '/vocab'}/")


def cmd_report(a):
    from .report import report

    path = report(a.pool, out=a.out, sections=a.sections or None)
    print(f"report: {path}")


# ---- scoring and curation -------------------------------------------------------------------------
def cmd_embed(a):
    params = {"model": a.model, "pretrained": a.pretrained, "masked": a.masked, "mask_fill": a.mask_fill}
    _run_op(a, "embed", {**params, **_kv(a.param)})


def cmd_aesthetic(a):
    _run_op(a, "aesthetic", {"weights": a.weights, "embed_stage": a.embed_stage}, batch_size=1024)


def cmd_cluster(a):
    from .curate.cluster import cluster

    _print(
        cluster(
            a.pool,
            embed_stage=a.embed_stage,
            k=a.k,
            pca_dim=a.pca_dim,
            niter=a.niter,
            nredo=a.nredo,
            seed=a.seed,
            min_points_per_centroid=a.min_points,
            max_points_per_centroid=a.max_points,
            eps=a.eps,
            keep=a.keep,
            centroids=a.centroids,
            dedup_fraction=a.dedup_fraction,
            stage=a.stage,
            kmeans=a.kmeans,
        )
    )


def cmd_select(a):
    from .curate.select import builtin_recipes, load_recipe, select

    if a.list or not a.recipe:
        for name in builtin_recipes():
            r = load_recipe(name)
            print(f"{name:<16} {' '.join(r.description.split())}")
        return
    for recipe in a.recipe:
        _print(
            select(
                a.pool,
                recipe,
                out=a.out if len(a.recipe) == 1 else None,
                name=a.name if len(a.recipe) == 1 else None,
                overrides=_kv(a.set),
                size_like=a.size_like,
            )
        )


# ---- training -------------------------------------------------------------------------------------
def _train_fields():
    import dataclasses

    from .train.trainer import TrainConfig

    return [f for f in dataclasses.fields(TrainConfig) if f.name not in ("train_data", "progress")]


def strip_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE` (to relaunch a command under another launcher)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == name:
            skip = True
        elif not x.startswith(name + "="):
            out.append(x)
    return out


def cmd_train(a):
    from .train import TrainConfig, train
    from .train.launch import run_distributed, summary_line

    cfg = yaml.safe_load(open(a.config)) if a.config else {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{a.config}: a training config is a mapping of options")
    for f in _train_fields():
        v = getattr(a, f.name)
        if v is not None:
            cfg[f.name] = v
    if a.train_data:
        cfg["train_data"] = a.train_data
    cfg["progress"] = not a.quiet
    if a.nproc and a.nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise SystemExit(run_distributed(TrainConfig.from_dict(cfg), a.nproc))
    s = train(TrainConfig.from_dict(cfg))
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary_line(s))


def cmd_export(a):
    from .models import export_open_clip

    out = export_open_clip(a.checkpoint, a.out, **({"model": a.model} if a.model else {}))
    print(f"export: {out} (open_clip, open_clip_train, CLIP_benchmark: --model local-dir:{out})")


# ---- evaluation -----------------------------------------------------------------------------------
def _named_paths(items: list[str] | None) -> dict:
    out = {}
    for it in items or ():
        name, sep, path = it.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(it)), it
        out[name] = path
    return out


def cmd_evaluate(a):
    from .evaluate import evaluate, results_table

    words = None
    if a.sync_vocab:
        from .profile import read_vocab

        words = read_vocab(a.sync_vocab, top=a.sync_top)
    recs = evaluate(
        a.model,
        a.pretrained,
        datasets=_named_paths(a.dataset),
        tasks=tuple(a.tasks.split(",")),
        out=a.out,
        name=a.name,
        retrieval_sets=_named_paths(a.retrieval) or None,
        sync_words=words,
        sync_font_scale=a.sync_font_scale,
        templates=a.templates,
        batch=a.batch_size,
        overwrite=a.overwrite,
    )
    print(results_table(a.out, models=sorted({r["model"] for r in recs})))


def cmd_attack(a):
    from .evaluate import build_attack

    r = build_attack(a.src, a.out, mode=a.mode, model=a.model, pretrained=a.pretrained, size_frac=a.size, seed=a.seed)
    print(f"attack ({r['mode']}): {r['images']} images -> {r['out']}")
    for k, v in list(r.get("targets", {}).items())[:20]:
        print(f"  {k} -> {v}")


def cmd_results(a):
    from .evaluate import results_table

    print(results_table(a.out, fmt=a.format, models=a.models or None))


def cmd_robustness(a):
    from .evaluate import robustness

    r = robustness(
        a.out,
        id_sets=a.id.split(","),
        ood_sets=a.ood.split(","),
        baselines=a.baselines.split(",") if a.baselines else None,
        link=a.link,
        plot=a.plot,
        score_baselines=a.score_baselines,
    )
    for pair, f in r["fits"].items():
        print(f"trend {pair}: {a.link}(ood) = {f['a']:.3f} * {a.link}(id) + {f['b']:.3f}")
    for m, er in r["effective_robustness"].items():
        print(
            f"  {m:<28} ER mean {er['mean']:+.4f}  " + "  ".join(f"{k} {v:+.4f}" for k, v in er.items() if k != "mean")
        )


def _audit_fields():
    import dataclasses

    from .evaluate.audit import AuditConfig

    return [f for f in dataclasses.fields(AuditConfig) if f.name not in ("models", "progress")]


def cmd_audit(a):
    from .evaluate.audit import AuditConfig, audit

    cfg = {f.name: getattr(a, f.name) for f in _audit_fields() if getattr(a, f.name) is not None}
    summaries = audit(AuditConfig(**cfg, models=a.models, progress=not a.quiet))
    if len(summaries) > 1:
        print(f"comparison: {summaries[0]['comparison']}")


def cmd_rewrite(a):
    from .rewrite import rewrite

    _print(
        rewrite(
            a.pool,
            backend=a.backend,
            k=a.k,
            styles=a.styles or None,
            model=a.model,
            seed=a.seed,
            temperature=a.temperature,
            top_p=a.top_p,
            max_tokens=a.max_tokens,
            retries=a.retries,
            retry_failed=a.retry_failed,
            concurrency=a.concurrency,
            timeout=a.timeout,
            base_url=a.base_url,
            api_key_env=a.api_key_env,
            workers=a.workers,
            threads=a.threads,
            draws=a.draws,
            max_caption_chars=a.max_caption_chars,
            max_captions=a.max_captions,
            overwrite=a.overwrite,
            progress=not a.quiet,
            stage=a.stage,
            backend_options=_kv(a.param),
            caption_column=a.caption_column,
        )
    )


# ---- de-parroting ---------------------------------------------------------------------------------
def add_config_flags(sp, cls, helps: dict, skip=()):
    """One flag per field of a config dataclass (flag name = field name), typed by the field; the
    default stays in the dataclass (flags default to None = not given)."""
    import dataclasses

    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        t = f.type if isinstance(f.type, str) else str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        h = f"{helps.get(f.name, '')} [{default}]"
        if "bool" in t and "|" not in t:
            sp.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif "dict" in t or "tuple" in t or "list" in t:
            sp.add_argument(flag, type=yaml.safe_load, default=None, metavar="YAML", help=h)
        elif "int" in t and "float" not in t:
            sp.add_argument(flag, type=int, default=None, help=h)
        elif "float" in t:
            sp.add_argument(flag, type=float, default=None, help=h)
        else:
            sp.add_argument(flag, default=None, help=h)


def config_from_flags(a, cls):
    """The config dataclass with every flag that was given."""
    import dataclasses

    return cls(**{f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if getattr(a, f.name, None) is not None})


def cmd_deparrot(a):
    from .deparrot import DeparrotConfig, deparrot, deparrot_counts

    ray = {k: getattr(a, k) for k in ("address", "num_cpus", "num_gpus") if getattr(a, k) is not None}
    s = deparrot(a.pool, config_from_flags(a, DeparrotConfig), progress=not a.quiet, engine_options=ray)
    _print(s)
    c = deparrot_counts(a.pool, s.stage)
    modes = ", ".join(f"{k} {v}" for k, v in sorted(c["modes"].items()))
    print(f"{s.stage}: {c['kept']} captions kept, {c['null']} null (nothing describable left); modes: {modes}; "
          f"{c['removed_words']} spelled words removed; max residual CoTR {c['max_residual_cotr']:.3f}")


def cmd_demo(a):
    import dataclasses

    from .demo import DemoOptions, demo, seeds_summary

    opts = {f.name: getattr(a, f.name) for f in dataclasses.fields(DemoOptions)}
    if a.summarize:
        print(seeds_summary(a.summarize, protocol=opts["protocol"]))
        return
    demo(out=a.out, size=a.size, seed=a.seed, workers=a.workers, models=a.models.split(",") if a.models else None,
         **opts)


# ---- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unparrot",
        description=("Find, measure and remove the text-spotting (parrot caption) bias in image-text data for CLIP."),
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, fn, help, desc=None):
        sp = sub.add_parser(
            name, help=help, description=desc or help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        sp.set_defaults(fn=fn)
        return sp

    from .engine import ENGINE_HELP, EngineConfig

    def common(sp, workers=2):
        """A per-sample stage's engine flags, from EngineConfig; only --workers has a per-stage default."""
        sp.add_argument("--workers", type=int, default=workers, help=ENGINE_HELP["workers"])
        add_config_flags(sp, EngineConfig, ENGINE_HELP, skip=("workers",))
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    sp = add(
        "synth",
        cmd_synth,
        "generate a synthetic parrot-world pool and evaluation sets",
        "Generate a synthetic pool of image-caption pairs (some with embedded text their captions parrot), "
        "with ground truth in each sample's .json, plus labelled evaluation sets in CLIP_benchmark's layout.",
    )
    sp.add_argument("out", help="output folder (becomes a pool)")
    sp.add_argument("-n", type=int, default=10000, help="number of pairs")
    sp.add_argument("--preset", default="laion", help="laion (LAION-like statistics) or learnable (tiny-CLIP friendly)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--shard-size", type=int, default=1000)
    sp.add_argument("--eval-per-class", type=int, default=50, help="images per class in each evaluation set")
    sp.add_argument("--param", action="append", metavar="KEY=VALUE", help="override a world parameter")
    sp.add_argument("--stats", action="store_true", help="print ground-truth text statistics")
    sp.add_argument("--workers", type=int, default=2, help="worker processes")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")

    sp = add(
        "ingest",
        cmd_ingest,
        "make a pool from shards, parquet, a CSV/JSONL table, ImageNet-Captions or a folder",
        "Tar shards are used in place (never copied); other inputs are written as shards into POOL/shards.",
    )
    sp.add_argument(
        "source",
        help="shard folder/glob/{a..b} pattern, .parquet, .csv/.tsv/.jsonl, ImageNet-Captions .json, or image folder",
    )
    sp.add_argument("pool", help="pool folder to create")
    sp.add_argument("--format", default="auto", help="auto, wds, parquet, table, imagenet-captions, folder")
    sp.add_argument("--shard-size", type=int, default=10000)
    sp.add_argument("--image-col", help="parquet column with image bytes")
    sp.add_argument("--path-col", help="column with image paths")
    sp.add_argument("--caption-col", help="column with captions")
    sp.add_argument("--image-root", help="folder that image paths are relative to (default: the table's folder)")
    sp.add_argument("--sep", help="CSV separator (default: tab for .tsv, comma otherwise)")
    sp.add_argument(
        "--caption-fields", default="title,tags,description", help="ImageNet-Captions fields joined into the caption"
    )
    sp.add_argument("--caption-join", default=" ", help="separator between ImageNet-Captions fields")
    sp.add_argument("--quiet", action="store_true")

    sp = add("run", cmd_run, "run any per-sample operator over a pool (generic stage runner)")
    sp.add_argument("pool")
    sp.add_argument("op", help="operator name (inspect, spot, parrot, embed, aesthetic, deparrot) or module:Class")
    sp.add_argument("--param", action="append", metavar="KEY=VALUE", help="operator parameter")
    sp.add_argument("--stage", help="output stage name (default: the operator name)")
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--overwrite", action="store_true", help="recompute a stage made with other parameters")
    common(sp)

    sp = add(
        "reshard",
        cmd_reshard,
        "write a subset of a pool as new shards",
        "Write the samples whose uid is in SUBSET (a DataComp .npy) as new webdataset shards in OUT/shards.",
    )
    sp.add_argument("pool")
    sp.add_argument("subset", help="subset .npy (sorted uids, dtype u8,u8)")
    sp.add_argument("out", help="output folder")
    sp.add_argument("--shard-size", type=int, default=10000)
    sp.add_argument("--columns", nargs="*", help="columns (stage.column or column) to add to each .json")
    sp.add_argument("--mask-text", action="store_true", help="write images with text boxes masked (needs spot)")
    sp.add_argument("--mask-fill", default="mean", help="mean, inpaint or solid")
    sp.add_argument("--caption-column", help="column (stage.column or column) written as each .txt instead of "
                    "the caption, e.g. deparrot_caption; the original goes to .json original_caption")
    sp.add_argument("--quiet", action="store_true")

    sp = add("info", cmd_info, "show a pool's shards, stages, counts and subsets")
    sp.add_argument("pool")
    sp.add_argument("--truth", action="store_true", help="also print synthetic ground-truth statistics")

    sp = add(
        "verify",
        cmd_verify,
        "check a pool's files against each other without recomputing",
        "Check every stage's column, error and embedding files against the shards, the subsets against the "
        "pool, and look for files left by interrupted writes. Exits 1 naming each file with a problem.",
    )
    sp.add_argument("pool")

    for op, helptext in (
        ("spot", "text spotting (OCR) per image: boxes, texts, has_text, text_area"),
        ("parrot", "co-embedded words and CoTR per caption (needs spot)"),
    ):
        sp = add(op, _stage_cmd(op), helptext)
        sp.add_argument("pool")
        if op == "spot":
            sp.add_argument("--backend", help="rapidocr (default), oracle (synthetic ground truth) or module:Class")
        else:
            sp.set_defaults(backend=None)
        sp.add_argument(
            "--param",
            action="append",
            metavar="KEY=VALUE",
            help="operator parameter (spot: min_score, min_area, min_chars, det_max_side, "
            "det_min_side, ...; parrot: stopwords, min_len, fuzzy, spot_stage, ...)",
        )
        sp.add_argument("--stage", help="output stage name")
        sp.add_argument("--batch-size", type=int, default=32)
        sp.add_argument("--overwrite", action="store_true")
        common(sp)

    sp = add(
        "profile",
        cmd_profile,
        "spot text and measure parroting over a pool, then print a summary",
        "Runs the spot and parrot stages (resumable) and prints: share of images with text, mean CoTR, "
        "share of captions with CoTR > 0, fully parroted captions, top co-embedded words.",
    )
    sp.add_argument("pool")
    sp.add_argument("--backend", default="rapidocr", help="OCR backend: rapidocr, oracle or module:Class")
    sp.add_argument("--det-max-side", type=int, help="downscale images whose long side is larger (speed)")
    sp.add_argument(
        "--det-min-side", type=int, help="upscale images whose long side is smaller (recall on tiny images)"
    )
    sp.add_argument("--min-score", type=float, help="minimum recognition score of a text instance")
    sp.add_argument("--min-area", type=float, help="minimum box area in pixels")
    sp.add_argument("--min-chars", type=int, help="minimum letters/digits in a text instance")
    sp.add_argument("--spot-param", action="append", metavar="KEY=VALUE")
    sp.add_argument(
        "--parrot-param",
        action="append",
        metavar="KEY=VALUE",
        help="CoTR variant: stopwords=true, min_len=2, fuzzy=true, keep_non_latin=true",
    )
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--overwrite", action="store_true")
    common(sp)

    sp = add("vocab", cmd_vocab, "caption 1-/2-gram and co-embedded 1-gram counts as CSV (ngram,count)")
    sp.add_argument("pool")
    sp.add_argument("--out", help="output folder (default POOL/vocab)")
    sp.add_argument("--top", type=int, default=1000)
    sp.add_argument("--stopwords", action="store_true", help="drop stop words")
    sp.add_argument("--min-len", type=int, default=1, help="drop tokens shorter than this")
    from .profile import VOCAB_HEADERS

    sp.add_argument("--format", choices=list(VOCAB_HEADERS), help="CSV layout: unparrot (header ngram,count; the "
                    "default) or parrot (the Parrot paper's pandas layout, header ,count)")

    sp = add("report", cmd_report, "write one self-contained HTML report of a pool")
    sp.add_argument("pool")
    sp.add_argument("--out", help="output file (default POOL/report.html)")
    sp.add_argument("--sections", nargs="*", help="sections to include (default: all with data)")

    sp = add(
        "embed",
        cmd_embed,
        "CLIP image/text embeddings and CLIP score per pair (and masked CLIP score)",
        "Any open_clip model (--model ViT-B-32 --pretrained FILE|TAG) or unparrot's small configs "
        "(unparrot-rn-tiny, unparrot-rn-tiny-v1k, unparrot-vit-tiny). --masked adds masked_clip_score "
        "(T-MARS: text boxes from the spot stage filled, scored against the original caption).",
    )
    sp.add_argument("pool")
    sp.add_argument("--model", default="ViT-B-32")
    sp.add_argument("--pretrained", help="checkpoint file, or an open_clip tag (needs the hub)")
    sp.add_argument("--masked", action="store_true", help="also score the text-masked image (needs spot)")
    sp.add_argument("--mask-fill", default="mean", help="mean (T-MARS), inpaint or solid")
    sp.add_argument("--param", action="append", metavar="KEY=VALUE", help="chunk, device, spot_stage, ...")
    sp.add_argument("--stage", help="output stage name (default embed)")
    sp.add_argument("--batch-size", type=int, default=256, help="samples per operator call (4 model chunks)")
    sp.add_argument("--overwrite", action="store_true")
    common(sp, workers=1)

    sp = add(
        "aesthetic",
        cmd_aesthetic,
        "LAION improved-aesthetic-predictor score from CLIP image embeddings",
        "Needs the released MLP weights (e.g. sac+logos+ava1-l14-linearMSE.pth) and ViT-L/14 image "
        "embeddings from an embed stage.",
    )
    sp.add_argument("pool")
    sp.add_argument("--weights", required=True, help="the predictor's weight file")
    sp.add_argument("--embed-stage", default="embed")
    sp.add_argument("--stage", help="output stage name (default aesthetic)")
    sp.add_argument("--overwrite", action="store_true")
    common(sp, workers=1)

    sp = add(
        "cluster",
        cmd_cluster,
        "PCA + k-means over image embeddings, then SemDeDup near-duplicates",
        "Writes cluster, dist_to_centroid, dup_of, keep_dedup. Defaults favour speed; the Parrot paper "
        "used k=4000 and --kmeans parrot on 107M pairs.",
    )
    sp.add_argument("pool")
    sp.add_argument("--embed-stage", default="embed")
    sp.add_argument("-k", type=int, help="clusters (default: about sqrt(n), at most 4000)")
    sp.add_argument("--pca-dim", type=int, default=256)
    sp.add_argument("--kmeans", default="fast", choices=["fast", "parrot"],
                    help="named k-means settings: fast (ours: niter 20, nredo 1, seed 42, 1/256 points per "
                    "centroid) or parrot (the Parrot paper's: 300, 10, 42, 10000/200000); the flags below override")
    sp.add_argument("--niter", type=int)
    sp.add_argument("--nredo", type=int)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--min-points", type=int, help="faiss min points per centroid")
    sp.add_argument("--max-points", type=int, help="faiss max points per centroid (training subsample)")
    sp.add_argument("--eps", type=float, default=0.05, help="duplicates: cosine similarity > 1 - eps")
    sp.add_argument("--dedup-fraction", type=float, help="instead of eps: drop about this share of the pool")
    sp.add_argument("--keep", default="far", help="far (SemDeDup: least typical first) or near")
    sp.add_argument("--centroids", help="folder of a previous run (POOL/cluster/<stage>) to assign with")
    sp.add_argument("--stage", default="cluster")

    sp = add(
        "select",
        cmd_select,
        "apply curation recipes: DataComp subset .npy + funnel",
        "Recipes are YAML (built-ins: all, less-is-more, cotr, clip-score, t-mars, parrot-debiased, random). "
        "Writes POOL/subsets/<name>.npy (sorted u8,u8 uids) and <name>.json (the funnel).",
    )
    sp.add_argument("pool")
    sp.add_argument("recipe", nargs="*", help="built-in name or YAML file (several allowed)")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe parameter, e.g. min_clip_score=0.28")
    sp.add_argument("--size-like", help="cut to the size of another subset (random control)")
    sp.add_argument("--name", help="subset name (default: the recipe name)")
    sp.add_argument("--out", help="subset path (default POOL/subsets/<name>.npy)")
    sp.add_argument("--list", action="store_true", help="list the built-in recipes")

    sp = add(
        "rewrite",
        cmd_rewrite,
        "LaCLIP caption rewrites (local llama.cpp model, an OpenAI-compatible server, or EDA)",
        "Rewrite every unique caption K times (cached, resumable) into POOL/columns/<stage>/; train with "
        "`unparrot reshard ... --columns rewrites` and `unparrot train --rewrites`. See docs/rewrite.md.",
    )
    sp.add_argument("pool")
    sp.add_argument("--backend", default="llama-cpp", help="llama-cpp (in-process GGUF), openai (any "
                    "OpenAI-compatible /v1/completions server) or eda (WordNet EDA baseline)")
    sp.add_argument("-k", type=int, default=4, help="rewrites per caption (style i mod the number of styles)")
    sp.add_argument("--styles", nargs="*", help="styles to use (LLMs: chat bard human coco; EDA: sr ri rs rd)")
    sp.add_argument("--model", help="GGUF path (llama-cpp; default: bundled Gemma-3-270M) or the server's model name")
    sp.add_argument("--base-url", help="openai backend: the server, e.g. http://host:8000/v1")
    sp.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    sp.add_argument("--concurrency", type=int, default=4, help="openai backend: requests in flight")
    sp.add_argument("--timeout", type=float, default=120.0, help="openai backend: seconds per request")
    sp.add_argument("--temperature", type=float, default=0.9)
    sp.add_argument("--top-p", type=float, default=0.95)
    sp.add_argument("--max-tokens", type=int, default=77)
    sp.add_argument("--retries", type=int, default=2, help="extra attempts for an unusable rewrite or a failed call")
    sp.add_argument("--retry-failed", action="store_true", help="try again the rewrites that failed in a previous run")
    sp.add_argument("--draws", type=int, help="fixed in-context draws per style (reuses the KV cache; faster on CPU)")
    sp.add_argument("--max-caption-chars", type=int, default=1000, help="longer captions are error rows")
    sp.add_argument("--max-captions", type=int, help="rewrite only the N most frequent unique captions (a budget)")
    sp.add_argument("--threads", type=int, help="llama-cpp threads per worker")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--stage", default="rewrite", help="output stage name")
    sp.add_argument("--overwrite", action="store_true", help="redo a stage made with other parameters")
    sp.add_argument("--param", action="append", metavar="KEY=VALUE", help="extra backend option")
    sp.add_argument("--workers", type=int, default=1, help="llama-cpp: model copies in worker processes")
    sp.add_argument("--caption-column", help="rewrite this column's captions instead of the shards' (e.g. "
                    "deparrot_caption: LaCLIP rewrites of de-parroted captions)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")

    sp = add(
        "deparrot",
        cmd_deparrot,
        "take the words an image spells out of its caption (strip) or rewrite it without them (LLM)",
        "Keeps the images with text: writes deparrot_caption (null when nothing describable is left), "
        "deparrot_mode, removed_words and residual_cotr into POOL/columns/<stage>/ (needs spot and parrot). "
        "Select with the deparrot recipe, reshard with --caption-column deparrot_caption. See docs/deparrot.md.",
    )
    sp.formatter_class = argparse.HelpFormatter  # defaults are shown in [brackets]
    sp.add_argument("pool")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    from .deparrot import OPTION_HELP as DEPARROT_HELP, DeparrotConfig

    add_config_flags(sp, DeparrotConfig, DEPARROT_HELP)
    add_config_flags(sp, EngineConfig, ENGINE_HELP, skip=("engine", "workers", "threads"))

    sp = add(
        "train",
        cmd_train,
        "train a CLIP model on shards (open_clip models, LaCLIP rewrites, DDP)",
        "Trains for a fixed number of samples seen (shards drawn with replacement), so every subset gets "
        "the same compute. Options come from --config YAML, then flags. Multi-process: --nproc N, or "
        "torchrun --nproc_per_node N -m unparrot train ...",
    )
    sp.formatter_class = argparse.HelpFormatter  # defaults are shown in [brackets]
    sp.add_argument("train_data", nargs="?", help="reshard output folder, folder of tars, glob or {a..b} pattern")
    sp.add_argument("--config", help="YAML file of training options (flags override it)")
    sp.add_argument("--nproc", type=int, default=0, help="launch N processes with torch.distributed.run")
    sp.add_argument("--quiet", action="store_true")
    from .train.trainer import OPTION_HELP, TrainConfig

    add_config_flags(sp, TrainConfig, OPTION_HELP, skip=("train_data", "progress"))

    sp = add(
        "export",
        cmd_export,
        "write a checkpoint as a folder open_clip's own loaders read (local-dir:OUT)",
        "OUT/open_clip_config.json + OUT/open_clip_model.safetensors: open_clip.create_model_and_transforms and "
        "get_tokenizer('local-dir:OUT') rebuild model and tokenizer without unparrot (dense-vocabulary models get "
        "open_clip's full token table). `unparrot train` writes RUN/open_clip/ at the end.",
    )
    sp.add_argument("checkpoint", help="checkpoint file (unparrot train's or open_clip_train's)")
    sp.add_argument("out", help="output folder")
    sp.add_argument("--model", help="architecture (default: the checkpoint's `name`)")

    sp = add(
        "evaluate",
        cmd_evaluate,
        "evaluate a CLIP model: zero-shot (+ attack success), retrieval, Sync score",
        "Writes one JSON per (model, task, dataset) in CLIP_benchmark's shape under --out; existing results "
        "are skipped. Labelled sets: CLIP_benchmark's webdataset layout or ImageFolder folders.",
    )
    sp.add_argument("--model", required=True, help="open_clip architecture or unparrot config")
    sp.add_argument("--pretrained", help="checkpoint file (or open_clip tag)")
    sp.add_argument("--name", help="name of the model in the results (default: the run folder or model)")
    sp.add_argument("--tasks", default="zeroshot", help="comma list of zeroshot, retrieval, sync")
    sp.add_argument("--dataset", action="append", metavar="NAME=PATH", help="labelled set for zeroshot (repeatable)")
    sp.add_argument("--retrieval", action="append", metavar="NAME=PATH", help="set with captions for retrieval")
    sp.add_argument("--sync-vocab", help="vocab CSV (unparrot vocab) or one word per line")
    sp.add_argument("--sync-top", type=int, default=200, help="words of the vocabulary to render")
    sp.add_argument("--sync-font-scale", type=float, help="font px / canvas (default 32/224)")
    sp.add_argument("--templates", help="openai, simple, plain or a file (default: the set's own)")
    sp.add_argument("--out", default="results")
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--overwrite", action="store_true")

    sp = add(
        "attack",
        cmd_attack,
        "build a typographically attacked copy of a labelled set",
        "attr (ImageNet-Attr): the class a reference model most confuses with the true one, in red near the "
        "top-left; random: a random wrong class, font, size, colour and position.",
    )
    sp.add_argument("src", help="labelled set folder")
    sp.add_argument("out", help="output folder")
    sp.add_argument("--mode", default="attr", help="attr or random")
    sp.add_argument("--model", help="reference model for attr")
    sp.add_argument("--pretrained", help="reference checkpoint")
    sp.add_argument("--size", type=float, default=0.25, help="font size / short side of the image")
    sp.add_argument("--seed", type=int, default=0)

    sp = add("results", cmd_results, "a table of results across models (markdown or CSV)")
    sp.add_argument("out", nargs="?", default="results")
    sp.add_argument("--format", default="md", help="md or csv")
    sp.add_argument("--models", nargs="*")

    sp = add(
        "robustness",
        cmd_robustness,
        "effective robustness (Fang et al.) from zero-shot results",
        "Fits link(acc_ood) = a*link(acc_id) + b over the baseline models and reports each model's accuracy "
        "above that trend, per shift and averaged.",
    )
    sp.add_argument("out", nargs="?", default="results")
    sp.add_argument("--id", required=True, help="in-distribution set name(s), comma separated")
    sp.add_argument("--ood", required=True, help="shifted set names, comma separated")
    sp.add_argument("--baselines", help="models defining the trend: a separate family (Fang et al.)")
    sp.add_argument("--score-baselines", action="store_true",
                    help="also score baseline models (their ER is fitted, ~0 by construction); with no "
                    "--baselines, fit the line through every model")
    sp.add_argument("--link", default="logit", help="logit, probit or linear")
    sp.add_argument("--plot", help="write a PNG of the fits")

    sp = add(
        "audit",
        cmd_audit,
        "the text-bias card of open_clip checkpoints: Sync score, typographic attack, word reading",
        "Audits each checkpoint (or model name: random weights) on rendered words and an attacked labelled set "
        "(optionally a pool's text reliance) and writes OUT/<name>/card.json (CLIP_benchmark-shaped results, "
        "`unparrot results OUT` tabulates them) and card.html; several models also get OUT/comparison.html. "
        "See docs/audit.md.",
    )
    sp.formatter_class = argparse.HelpFormatter  # defaults are shown in [brackets]
    sp.add_argument("models", nargs="+", help="checkpoint files (or model names, for random weights)")
    sp.add_argument("--quiet", action="store_true")
    import dataclasses

    from .evaluate.audit import OPTION_HELP as AUDIT_HELP

    for f in _audit_fields():
        flag = "--" + f.name.replace("_", "-")
        t = f.type if isinstance(f.type, str) else str(f.type)
        d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        h = f"{AUDIT_HELP.get(f.name, '')} [{d}]"
        if "list" in t:
            sp.add_argument(flag, nargs="+", default=None, help=h)
        elif t == "int":
            sp.add_argument(flag, type=int, default=None, help=h)
        elif t == "float":
            sp.add_argument(flag, type=float, default=None, help=h)
        else:
            sp.add_argument(flag, default=None, help=h)

    sp = add("demo", cmd_demo, "run the whole pipeline on a synthetic world and report the findings")
    sp.add_argument("--out", default="demo-out", help="output folder (a rerun resumes)")
    sp.add_argument(
        "--size", default="default",
        help="a size of the protocol: small (CI check, ~3 min), default (~25 min on 2 cores), full (every "
        "finding, with the effective-robustness design) or large",
    )
    sp.add_argument("--summarize", nargs="+", metavar="OUT",
                    help="print mean ± std and the pooled verdicts over finished demo runs (one per seed)")
    import dataclasses

    from .demo import DEMO_OPTION_HELP, DemoOptions

    for f in dataclasses.fields(DemoOptions):  # demo options: flags generated from the typed dataclass
        sp.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=DEMO_OPTION_HELP[f.name])
    sp.add_argument("--models", help="comma-separated models to train instead of the size's set "
                    "(all, clip-score, parrot-debiased, less-is-more, t-mars, cotr, random, laclip, laclip-debiased)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--workers", type=int, default=2)
    return p


def _version() -> str:
    from . import __version__

    return __version__


def _user_errors() -> tuple:
    """What a user's input or machine can cause (bad arguments, files, disks, servers, checkpoints, YAML):
    reported in one line. OSError covers read-only folders, a full disk (ENOSPC) and ConnectionError."""
    import pickle

    return (ValueError, KeyError, TypeError, OSError, RuntimeError, ImportError, EOFError,
            pickle.UnpicklingError, yaml.YAMLError)


USER_ERRORS = _user_errors()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    a = parser.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(a, "fn", None):
        parser.print_help()
        return 2
    try:
        rc = a.fn(a)  # a command may return its exit status (verify: 1 when it found problems)
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("UNPARROT_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        msg = " ".join(str(msg).split())  # one line, whatever the exception's text looks like
        print(f"unparrot {a.command}: error: {msg}  (UNPARROT_DEBUG=1 shows a traceback)", file=sys.stderr)
        return 1
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
