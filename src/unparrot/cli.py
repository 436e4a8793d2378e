"""Command line: one subcommand per public function. Every argument is generated from a typed config, the
dataclass next to the function a command wraps (flags.py: flag name = field name, the default and the help
in the dataclass), so the parser cannot drift from the API; each handler parses, builds the config, calls
and prints. The few options that only the command line has live in the small dataclasses below."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import yaml

from .flags import add_config_flags, call_with, config_from_flags, given, key_values, option


# ---- options only the command line has ------------------------------------------------------------
@dataclass
class Quiet:
    quiet: bool = option(False, "no progress bar")


@dataclass
class Params:
    param: dict | None = key_values("operator parameter (repeatable)")


@dataclass
class SynthExtras:
    param: dict | None = key_values("override a world parameter (repeatable)")
    stats: bool = option(False, "print ground-truth text statistics")


@dataclass
class SelectExtras:
    recipe: list = option([], "built-in name or YAML file (several allowed)", positional=True, nargs="*")
    list: bool = option(False, "list the built-in recipes")


@dataclass
class EvaluateExtras:
    """--sync-vocab is read into evaluate()'s sync_words (its most frequent --sync-top words)."""

    sync_vocab: str | None = option(None, "vocab CSV (unparrot vocab) or one word per line")
    sync_top: int = option(200, "words of the vocabulary to render")


@dataclass
class TrainExtras:
    train_data: str | None = option(
        None, "reshard output folder, folder of tars, glob or {a..b} pattern", positional=True
    )
    config: str | None = option(None, "YAML file of training options (flags override it)")
    nproc: int = option(0, "launch N processes with torch.distributed.run")


@dataclass
class DemoExtras:
    summarize: list | None = option(
        None,
        "print mean ± std and the pooled verdicts over finished demo runs (one per seed)",
        nargs="+",
        metavar="OUT",
    )


@dataclass
class RunOp:
    op: str = option(
        help="operator name (inspect, spot, parrot, embed, aesthetic, deparrot) or module:Class", positional=True
    )


@dataclass
class PoolArg:
    pool: str = option(help="pool folder", positional=True)


def _print(obj):
    print(obj.line() if hasattr(obj, "line") else json.dumps(obj, indent=1, default=str))


def _params(a) -> dict:
    return given(a, Params).get("param", {})


# ---- foundation ---------------------------------------------------------------------------------
def cmd_synth(a):
    from .synth.generate import SynthConfig, synth
    from .synth.stats import format_truth_stats, truth_stats

    cfg = config_from_flags(a, SynthConfig)
    s = call_with(synth, cfg, progress=not a.quiet, **given(a, SynthExtras).get("param", {}))
    print(
        f"synth: {s['samples']} pairs in {s['shards']} shards, {sum(s['eval_sets'].values())} evaluation "
        f"images in {len(s['eval_sets'])} sets ({s['seconds']}s) -> {cfg.out}"
    )
    if a.stats:
        print(format_truth_stats(truth_stats(cfg.out)))


def cmd_ingest(a):
    from .ingest import IngestConfig, ingest

    _print(call_with(ingest, config_from_flags(a, IngestConfig), progress=not a.quiet))


def engine_options(a) -> dict:
    """The engine flags of a stage command as `run()` keywords (unset flags: EngineConfig's defaults)."""
    from .engine import EngineConfig

    return dataclasses.asdict(config_from_flags(a, EngineConfig))


def _run_op(a, op: str, params: dict):
    """The per-sample stage commands: operator `op` over the pool with the stage and engine flags of `a`."""
    from .engine import StageConfig, run

    _print(run(a.pool, op, params, **given(a, StageConfig), progress=not a.quiet, **engine_options(a)))


def cmd_run(a):
    _run_op(a, a.op, _params(a))


def _op_config(op):
    """The config class of a stage command's operator (its flags; the rest goes through --param)."""
    from .ops.aesthetic import AestheticConfig
    from .ops.embed import EmbedConfig
    from .ops.parrot import ParrotConfig
    from .ops.spot import SpotConfig

    return {"spot": SpotConfig, "parrot": ParrotConfig, "embed": EmbedConfig, "aesthetic": AestheticConfig}[op]


def _stage_cmd(op):
    def cmd(a):
        _run_op(a, op, {**given(a, _op_config(op)), **_params(a)})

    return cmd


def cmd_reshard(a):
    from .curate.reshard import ReshardConfig, reshard

    _print(call_with(reshard, config_from_flags(a, ReshardConfig), a.pool, progress=not a.quiet))


def cmd_info(a):
    from .profile import InfoConfig, pool_info

    info = call_with(pool_info, config_from_flags(a, InfoConfig), a.pool)
    print(f"pool {info['root']}: {info['shards']} shards, {info['samples']} samples")
    for st, s in info["stages"].items():
        print(
            f"  {st:<16} {s['done_shards']}/{info['shards']} shards, {s['rows']} rows, {s['errors']} errors"
            f"  [{s['op']}]"
        )
    for name, n in info["subsets"].items():
        print(f"  subset {name:<12} {n} uids")
    if "truth" in info:
        from .synth.stats import format_truth_stats

        print(format_truth_stats(info["truth"]))


def cmd_verify(a):
    from .verify import verify

    rep = verify(a.pool)
    print(rep.line())
    return 0 if rep.ok else 1


# ---- profiling ----------------------------------------------------------------------------------
def cmd_profile(a):
    from .engine import EngineConfig
    from .ops.spot import SpotConfig
    from .profile import ProfileConfig, profile

    cfg = config_from_flags(a, ProfileConfig)
    cfg.spot_params = {**(cfg.spot_params or {}), **given(a, SpotConfig, skip=("backend",))}
    engine = given(a, EngineConfig, skip=("workers",))
    print(call_with(profile, cfg, a.pool, progress=not a.quiet, **engine).line())


def cmd_vocab(a):
    from .profile import VocabConfig, vocab

    cfg = config_from_flags(a, VocabConfig)
    v = call_with(vocab, cfg, a.pool)
    for name, rows in v.items():
        print(f"{name}: {len(rows)} n-grams; top: " + ", ".join(f"{w} ({c})" for w, c in rows[:8]))
    print(f"written to {cfg.out or str(a.pool) + '/vocab'}/")


def cmd_report(a):
    from .report import ReportConfig, report

    print(f"report: {call_with(report, config_from_flags(a, ReportConfig), a.pool)}")


# ---- scoring and curation -------------------------------------------------------------------------
def cmd_cluster(a):
    from .curate.cluster import ClusterConfig, cluster

    _print(call_with(cluster, config_from_flags(a, ClusterConfig), a.pool))


def cmd_select(a):
    from .curate.select import SelectConfig, builtin_recipes, load_recipe, select

    if a.list or not a.recipe:
        for name in builtin_recipes():
            r = load_recipe(name)
            print(f"{name:<16} {' '.join(r.description.split())}")
        return
    cfg = config_from_flags(a, SelectConfig)
    if len(a.recipe) > 1:  # several recipes: each is named (and written) by itself
        cfg.out = cfg.name = None
    for recipe in a.recipe:
        _print(call_with(select, cfg, a.pool, recipe))


# ---- training -------------------------------------------------------------------------------------
def _train_fields():
    from .train.trainer import TrainConfig

    return [f for f in dataclasses.fields(TrainConfig) if f.name not in ("train_data", "progress")]


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
    from .models import ExportConfig, export_open_clip

    out = call_with(export_open_clip, config_from_flags(a, ExportConfig))
    print(f"export: {out} (open_clip, open_clip_train, CLIP_benchmark: --model local-dir:{out})")


# ---- evaluation -----------------------------------------------------------------------------------
def cmd_evaluate(a):
    from .evaluate import EvaluateConfig, evaluate, results_table

    cfg = config_from_flags(a, EvaluateConfig)
    if a.sync_vocab:
        from .profile import read_vocab

        cfg.sync_words = read_vocab(a.sync_vocab, top=a.sync_top)
    recs = call_with(evaluate, cfg)
    print(results_table(cfg.out, models=sorted({r["model"] for r in recs})))


def cmd_attack(a):
    from .evaluate.attack import AttackConfig, build_attack

    r = call_with(build_attack, config_from_flags(a, AttackConfig))
    print(f"attack ({r['mode']}): {r['images']} images -> {r['out']}")
    for k, v in list(r.get("targets", {}).items())[:20]:
        print(f"  {k} -> {v}")


def cmd_results(a):
    from .evaluate.results import ResultsConfig, results_table

    print(call_with(results_table, config_from_flags(a, ResultsConfig)))


def cmd_robustness(a):
    from .evaluate import robustness
    from .evaluate.robustness import RobustnessConfig

    cfg = config_from_flags(a, RobustnessConfig)
    r = call_with(robustness, cfg)
    for pair, f in r["fits"].items():
        print(f"trend {pair}: {cfg.link}(ood) = {f['a']:.3f} * {cfg.link}(id) + {f['b']:.3f}")
    for m, er in r["effective_robustness"].items():
        print(
            f"  {m:<28} ER mean {er['mean']:+.4f}  " + "  ".join(f"{k} {v:+.4f}" for k, v in er.items() if k != "mean")
        )


def cmd_audit(a):
    from .evaluate.audit import AuditConfig, audit

    summaries = audit(config_from_flags(a, AuditConfig, progress=not a.quiet))
    if len(summaries) > 1:
        print(f"comparison: {summaries[0]['comparison']}")


def cmd_rewrite(a):
    from .rewrite import RewriteConfig, rewrite

    _print(call_with(rewrite, config_from_flags(a, RewriteConfig), a.pool, progress=not a.quiet))


# ---- de-parroting ---------------------------------------------------------------------------------
def cmd_deparrot(a):
    from .deparrot import DeparrotConfig, deparrot, deparrot_counts

    ray = {k: getattr(a, k) for k in ("address", "num_cpus", "num_gpus") if getattr(a, k) is not None}
    s = deparrot(a.pool, config_from_flags(a, DeparrotConfig), progress=not a.quiet, engine_options=ray)
    _print(s)
    c = deparrot_counts(a.pool, s.stage)
    modes = ", ".join(f"{k} {v}" for k, v in sorted(c["modes"].items()))
    print(
        f"{s.stage}: {c['kept']} captions kept, {c['null']} null (nothing describable left); modes: {modes}; "
        f"{c['removed_words']} spelled words removed; max residual CoTR {c['max_residual_cotr']:.3f}"
    )


def cmd_demo(a):
    import dataclasses

    from .demo import DemoOptions, demo, seeds_summary

    opts = {f.name: getattr(a, f.name) for f in dataclasses.fields(DemoOptions)}
    if a.summarize:
        print(seeds_summary(a.summarize, protocol=opts["protocol"]))
        return
    demo(
        out=a.out, size=a.size, seed=a.seed, workers=a.workers, models=a.models.split(",") if a.models else None, **opts
    )


# ---- parser -------------------------------------------------------------------------------------
def _stage_defaults() -> dict:
    """Each per-sample stage command's own batch size and workers (the other engine and stage defaults are
    EngineConfig's and StageConfig's); spot and parrot run as `profile` runs them."""
    from .profile import ProfileConfig

    profile_run = {"batch_size": ProfileConfig.batch_size, "workers": ProfileConfig.workers}
    return {
        "run": {"workers": ProfileConfig.workers},
        "spot": profile_run,
        "parrot": profile_run,
        "embed": {"batch_size": 256, "workers": 1},
        "aesthetic": {"batch_size": 1024, "workers": 1},
    }


def commands() -> list[tuple]:
    """(name, handler, help, description, configs): a command's arguments come from its configs, in order;
    a config is a class or (class, add_config_flags keywords)."""
    from .curate.cluster import ClusterConfig
    from .curate.select import SelectConfig
    from .demo import DemoConfig, DemoOptions
    from .deparrot import DeparrotConfig
    from .engine import EngineConfig, StageConfig
    from .evaluate import EvaluateConfig
    from .evaluate.attack import AttackConfig
    from .evaluate.audit import AuditConfig
    from .evaluate.results import ResultsConfig
    from .evaluate.robustness import RobustnessConfig
    from .ingest import IngestConfig
    from .curate.reshard import ReshardConfig
    from .models import ExportConfig
    from .ops.spot import SpotConfig
    from .profile import InfoConfig, ProfileConfig, VocabConfig
    from .report import ReportConfig
    from .rewrite import RewriteConfig
    from .synth.generate import SynthConfig
    from .train.trainer import TrainConfig

    stage = _stage_defaults()

    def stage_configs(op, *own):
        d = stage[op]
        return [PoolArg, *own, (StageConfig, {"defaults": d}), (EngineConfig, {"defaults": d}), Quiet]

    return [
        (
            "synth",
            cmd_synth,
            "generate a synthetic parrot-world pool and evaluation sets",
            "Generate a synthetic pool of image-caption pairs (some with embedded text their captions parrot), with "
            "ground truth in each sample's .json, plus labelled evaluation sets in CLIP_benchmark's layout.",
            [SynthConfig, SynthExtras, Quiet],
        ),
        (
            "ingest",
            cmd_ingest,
            "make a pool from shards, parquet, a CSV/JSONL table, ImageNet-Captions or a folder",
            "Tar shards are used in place (never copied); other inputs are written as shards into POOL/shards.",
            [IngestConfig, Quiet],
        ),
        (
            "run",
            cmd_run,
            "run any per-sample operator over a pool (generic stage runner)",
            None,
            stage_configs("run", RunOp, Params),
        ),
        (
            "reshard",
            cmd_reshard,
            "write a subset of a pool as new shards",
            "Write the samples whose uid is in SUBSET (a DataComp .npy) as new webdataset shards in OUT/shards.",
            [PoolArg, ReshardConfig, Quiet],
        ),
        ("info", cmd_info, "show a pool's shards, stages, counts and subsets", None, [PoolArg, InfoConfig]),
        (
            "verify",
            cmd_verify,
            "check a pool's files against each other without recomputing",
            "Check every stage's column, error and embedding files against the shards, the subsets against the "
            "pool, and look for files left by interrupted writes. Exits 1 naming each file with a problem.",
            [PoolArg],
        ),
        (
            "spot",
            _stage_cmd("spot"),
            "text spotting (OCR) per image: boxes, texts, has_text, text_area",
            None,
            stage_configs("spot", SpotConfig, Params),
        ),
        (
            "parrot",
            _stage_cmd("parrot"),
            "co-embedded words and CoTR per caption (needs spot)",
            None,
            stage_configs("parrot", _op_config("parrot"), Params),
        ),
        (
            "profile",
            cmd_profile,
            "spot text and measure parroting over a pool, then print a summary",
            "Runs the spot and parrot stages (resumable) and prints: share of images with text, mean CoTR, share of "
            "captions with CoTR > 0, fully parroted captions, top co-embedded words.",
            [
                PoolArg,
                ProfileConfig,
                (SpotConfig, {"skip": ("backend",)}),
                (EngineConfig, {"skip": ("workers",)}),
                Quiet,
            ],
        ),
        (
            "vocab",
            cmd_vocab,
            "caption 1-/2-gram and co-embedded 1-gram counts as CSV (ngram,count)",
            None,
            [PoolArg, VocabConfig],
        ),
        ("report", cmd_report, "write one self-contained HTML report of a pool", None, [PoolArg, ReportConfig]),
        (
            "embed",
            _stage_cmd("embed"),
            "CLIP image/text embeddings and CLIP score per pair (and masked CLIP score)",
            "Any open_clip model (--model ViT-B-32 --pretrained FILE|TAG) or unparrot's small configs "
            "(unparrot-rn-tiny, unparrot-rn-tiny-v1k, unparrot-vit-tiny). --masked adds masked_clip_score (T-MARS: "
            "text boxes from the spot stage filled, scored against the original caption).",
            stage_configs("embed", _op_config("embed"), Params),
        ),
        (
            "aesthetic",
            _stage_cmd("aesthetic"),
            "LAION improved-aesthetic-predictor score from CLIP image embeddings",
            "Needs the released MLP weights (e.g. sac+logos+ava1-l14-linearMSE.pth) and ViT-L/14 image embeddings "
            "from an embed stage.",
            stage_configs("aesthetic", _op_config("aesthetic")),
        ),
        (
            "cluster",
            cmd_cluster,
            "PCA + k-means over image embeddings, then SemDeDup near-duplicates",
            "Writes cluster, dist_to_centroid, dup_of, keep_dedup. Defaults favour speed; the Parrot paper used "
            "k=4000 and --kmeans parrot on 107M pairs.",
            [PoolArg, ClusterConfig],
        ),
        (
            "select",
            cmd_select,
            "apply curation recipes: DataComp subset .npy + funnel",
            "Recipes are YAML (built-ins: all, less-is-more, cotr, clip-score, t-mars, parrot-debiased, random). "
            "Writes POOL/subsets/<name>.npy (sorted u8,u8 uids) and <name>.json (the funnel).",
            [PoolArg, SelectExtras, SelectConfig],
        ),
        (
            "rewrite",
            cmd_rewrite,
            "LaCLIP caption rewrites (local llama.cpp model, an OpenAI-compatible server, or EDA)",
            "Rewrite every unique caption N times (cached, resumable) into POOL/columns/<stage>/; train with "
            "`unparrot reshard ... --columns rewrites` and `unparrot train --rewrites`. See docs/rewrite.md.",
            [PoolArg, RewriteConfig, Quiet],
        ),
        (
            "deparrot",
            cmd_deparrot,
            "take the words an image spells out of its caption (strip) or rewrite it without them (LLM)",
            "Keeps the images with text: writes deparrot_caption (null when nothing describable is left), "
            "deparrot_mode, removed_words and residual_cotr into POOL/columns/<stage>/ (needs spot and parrot). "
            "Select with the deparrot recipe, reshard with --caption-column deparrot_caption. See docs/deparrot.md.",
            [PoolArg, Quiet, DeparrotConfig, (EngineConfig, {"skip": ("engine", "workers", "threads")})],
        ),
        (
            "train",
            cmd_train,
            "train a CLIP model on shards (open_clip models, LaCLIP rewrites, DDP)",
            "Trains for a fixed number of samples seen (shards drawn with replacement), so every subset gets the "
            "same compute. Options come from --config YAML, then flags. Multi-process: --nproc N, or torchrun "
            "--nproc_per_node N -m unparrot train ...",
            [TrainExtras, Quiet, (TrainConfig, {"skip": ("train_data", "progress")})],
        ),
        (
            "export",
            cmd_export,
            "write a checkpoint as a folder open_clip's own loaders read (local-dir:OUT)",
            "OUT/open_clip_config.json + OUT/open_clip_model.safetensors: open_clip.create_model_and_transforms and "
            "get_tokenizer('local-dir:OUT') rebuild model and tokenizer without unparrot (dense-vocabulary models "
            "get open_clip's full token table). `unparrot train` writes RUN/open_clip/ at the end.",
            [ExportConfig],
        ),
        (
            "evaluate",
            cmd_evaluate,
            "evaluate a CLIP model: zero-shot (+ attack success), retrieval, Sync score",
            "Writes one JSON per (model, task, dataset) in CLIP_benchmark's shape under --out; existing results are "
            "skipped. Labelled sets: CLIP_benchmark's webdataset layout or ImageFolder folders.",
            [(EvaluateConfig, {"skip": ("sync_words",)}), EvaluateExtras],
        ),
        (
            "attack",
            cmd_attack,
            "build a typographically attacked copy of a labelled set",
            "attr (ImageNet-Attr): the class a reference model most confuses with the true one, in red near the "
            "top-left; random: a random wrong class, font, size, colour and position.",
            [AttackConfig],
        ),
        ("results", cmd_results, "a table of results across models (markdown or CSV)", None, [ResultsConfig]),
        (
            "robustness",
            cmd_robustness,
            "effective robustness (Fang et al.) from zero-shot results",
            "Fits link(acc_ood) = a*link(acc_id) + b over the baseline models and reports each model's accuracy "
            "above that trend, per shift and averaged.",
            [RobustnessConfig],
        ),
        (
            "audit",
            cmd_audit,
            "the text-bias card of open_clip checkpoints: Sync score, typographic attack, word reading",
            "Audits each checkpoint (or model name: random weights) on rendered words and an attacked labelled set "
            "(optionally a pool's text reliance) and writes OUT/<name>/card.json (CLIP_benchmark-shaped results, "
            "`unparrot results OUT` tabulates them) and card.html; several models also get OUT/comparison.html. "
            "See docs/audit.md.",
            [(AuditConfig, {"skip": ("progress",)}), Quiet],
        ),
        (
            "demo",
            cmd_demo,
            "run the whole pipeline on a synthetic world and report the findings",
            None,
            [(DemoConfig, {"with_defaults": True}), (DemoOptions, {"with_defaults": True}), DemoExtras],
        ),
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unparrot",
        description=("Find, measure and remove the text-spotting (parrot caption) bias in image-text data for CLIP."),
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, fn, help, desc, configs in commands():
        sp = sub.add_parser(name, help=help, description=desc or help)  # defaults are shown in [brackets]
        sp.set_defaults(fn=fn)
        for c in configs:
            cls, kw = c if isinstance(c, tuple) else (c, {})
            add_config_flags(sp, cls, **kw)
    return p


def _version() -> str:
    from . import __version__

    return __version__


def _user_errors() -> tuple:
    """What a user's input or machine can cause (bad arguments, files, disks, servers, checkpoints, YAML):
    reported in one line. OSError covers read-only folders, a full disk (ENOSPC) and ConnectionError."""
    import pickle

    return (
        ValueError,
        KeyError,
        TypeError,
        OSError,
        RuntimeError,
        ImportError,
        EOFError,
        pickle.UnpicklingError,
        yaml.YAMLError,
    )


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
