"""`unparrot demo`: the five papers' findings in miniature, on the synthetic world, in one command.

What it runs, and what each finding claims, comes from a protocol (protocols/demo.yaml; docs/protocol.md)
written before the runs. Stages (each resumable; everything stays in OUT/):
 1. a synthetic web pool (`learnable` preset, tuned so a tiny CPU CLIP can learn shapes and reading) and
    its evaluation sets; at sizes with the effective-robustness design also its worlds (narrow, diverse,
    narrow with class-name captions);
 2. profile it with the real OCR (rapidocr), de-parrot the captions (the deparrot stage, strip), train a
    baseline CLIP on everything, score the pool with it (CLIP score and masked CLIP score), cluster and
    dedup;
 3. subsets with the recipes; caption rewrites with the local LLM (unique captions, cached); a model
    with a `caption_column` (deparrot) trains on shards whose captions come from that column;
 4. one model per subset with the same number of samples seen, plus LaCLIP (all data + rewrites), and the
    ER baseline family and treatments;
 5. evaluate: clean zero-shot, attacked accuracy and attack success, Sync score, shifted sets, with
    per-image outcomes; ER against the separate baseline family;
 6. the results table, every finding's verdict with its interval, and the HTML report.
Every stage is a call of the Python API; models train two at a time, one process per core
(`train.launch`). The numbers and tables are in findings.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..flags import option
from ..train import TrainConfig
from .findings import SHIFTS, demo_table, er_table, protocol_digest


@dataclass
class DemoOptions:
    """Options of `unparrot demo` beyond size, seed, workers and models (CLI flags are generated from these
    fields, and their defaults live here only)."""

    # a built-in protocol (src/unparrot/protocols/<name>.yaml) or a YAML file
    protocol: str = option("demo", "built-in protocol name or YAML file: findings, sizes, worlds, ER design")


@dataclass
class DemoConfig:
    """The run options of `demo()` (its signature defaults read these; the CLI's flags are made from them)."""

    out: str = option("demo-out", "output folder (a rerun resumes)")
    size: str = option(
        "default",
        "a size of the protocol: small (CI check, ~3 min), default (~25 min on 2 cores), "
        "full (every finding, with the effective-robustness design) or large",
    )
    seed: int = option(0, "seed of the world, the subsets and the training runs")
    workers: int = option(2, "worker processes (stages) and models trained at a time")
    models: list | None = option(
        None,
        "comma-separated models to train instead of the size's set (all, clip-score, "
        "parrot-debiased, less-is-more, t-mars, cotr, random, laclip, laclip-debiased)",
        item=str,
    )


def _say(msg: str):
    print(msg, flush=True)


class Clock:
    def __init__(self):
        self.t0 = time.time()

    def __str__(self):
        s = int(time.time() - self.t0)
        return f"{s // 60:02d}:{s % 60:02d}"


@dataclass
class _Demo:
    """One demo run: its plan (from the protocol) and what the steps have made so far."""

    out: Path
    proto: object  # protocol.Protocol
    size: str
    seed: int
    workers: int
    chosen: tuple  # models to train, the baseline "all" first
    er_runs: dict  # ER run name -> {world, pairs, steps, family, checkpoint_every}
    clock: Clock = field(default_factory=Clock)
    pool: object = None  # pool.Pool
    er_pools: dict = field(default_factory=dict)  # ER world -> pool folder
    sel: dict = field(default_factory=dict)  # recipe -> select() summary
    words: list = field(default_factory=list)  # the Sync vocabulary: the pool's top caption words
    vocab_file: Path | None = None

    @property
    def cfg(self):  # the size's settings
        return self.proto.sizes[self.size]

    @property
    def models(self) -> dict:
        return self.proto.models

    @property
    def train(self) -> dict:  # the protocol's training settings at this size's batch
        return dict(self.proto.train, batch=self.cfg.batch)

    @property
    def note(self) -> str:
        return f"protocol {self.proto.name} ({self.proto.path})"

    @property
    def eval_dir(self) -> Path:
        return self.out / "pool" / "eval"


def demo(
    out: str = DemoConfig.out,
    size: str = DemoConfig.size,
    seed: int = DemoConfig.seed,
    workers: int = DemoConfig.workers,
    models: list[str] | None = DemoConfig.models,
    protocol: str = DemoOptions.protocol,
) -> dict:
    """Run the demo into `out` (a rerun resumes; nothing finished is trained twice) and return the findings
    with their verdicts."""
    d = _plan(out, size, seed, workers, models, protocol)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d.out.mkdir(parents=True, exist_ok=True)
    _say(f"unparrot demo --size {size} (seed {seed}) -> {d.out}   {d.note}")
    _make_worlds(d)
    _profile_and_deparrot(d)
    _first_subsets_and_rewrites(d)
    _train_first_models(d)
    _score_and_select(d)
    _train_other_models(d)
    er = _evaluate_models(d)
    return _results(d, er)


def _plan(out, size: str, seed: int, workers: int, models, protocol: str) -> _Demo:
    """The run's plan from the protocol, checked before any work: the size, the models (the baseline
    "all" always, since it scores the pool) and the ER runs at this size."""
    from ..protocol import load_protocol

    proto = load_protocol(protocol)
    if size not in proto.sizes:
        raise ValueError(f"unknown demo size {size!r}; one of {', '.join(proto.sizes)}")
    chosen = tuple(models) if models else proto.sizes[size].models
    bad = [m for m in chosen if m not in proto.models]
    if bad:
        raise ValueError(f"unknown demo models {bad}; known: {', '.join(proto.models)}")
    if "all" not in chosen:
        chosen = ("all",) + chosen
    return _Demo(Path(out), proto, size, seed, workers, chosen, proto.er_runs(size))


def _make_worlds(d: _Demo):
    """[1/6] The synthetic pool and its evaluation sets, and the ER worlds when the size runs ER."""
    from ..pool import Pool
    from ..synth.generate import synth

    cfg, w = d.cfg, d.proto.world
    _say(f"[1/6] [{d.clock}] synthetic world: {cfg.n} pairs (preset {w['preset']}) + evaluation sets")
    s = synth(
        d.out / "pool",
        n=cfg.n,
        preset=w["preset"],
        seed=d.seed,
        shard_size=cfg.shard_size,
        eval_per_class=cfg.eval_per_class,
        attack_size=w["attack_size"],
        workers=d.workers,
        progress=False,
    )
    _say(
        f"      {s['samples']} pairs in {s['shards']} shards; {100 * s['share_with_text']:.1f}% with text; "
        f"eval sets: {', '.join(f'{k} ({v})' for k, v in s['eval_sets'].items())}"
    )
    d.er_pools = _er_worlds(d) if d.er_runs else {}
    d.pool = Pool(d.out / "pool")


def _er_worlds(d: _Demo) -> dict:
    """The ER worlds (learnable preset + the protocol's parameters): one pool per world, as large as its
    largest run (smaller runs train on its first shards); evaluation sets only for the eval world."""
    from ..synth.generate import synth

    er, sc = d.proto.er, d.cfg.er
    pools = {}
    for name, params in er["worlds"].items():
        used = [r["pairs"] for r in d.er_runs.values() if r["world"] == name]
        if not used:
            continue
        folder = d.out / "er" / "pools" / name
        evals = (er["id_set"], *er["shifts"]) if name == er["eval_world"] else ()
        s = synth(
            folder,
            n=max(used),
            preset=d.proto.world["preset"],
            seed=d.seed,
            shard_size=sc["shard_size"],
            eval_per_class=sc["eval_per_class"],
            eval_sets=evals,
            attack_size=d.proto.world["attack_size"],
            workers=d.workers,
            progress=False,
            **params,
        )
        ev = f"; eval sets: {', '.join(f'{k} ({v})' for k, v in s['eval_sets'].items())}" if evals else ""
        _say(f"      ER world {name}: {s['samples']} pairs ({', '.join(f'{k}={v}' for k, v in params.items())}){ev}")
        pools[name] = folder
    return pools


def _profile_and_deparrot(d: _Demo):
    """[2/6] OCR profile, de-parroted captions (strip), and the vocabulary file: the Sync words, class names
    and prompt templates every model's dense vocabulary must hold."""
    from ..deparrot import deparrot, deparrot_counts
    from ..profile import profile, vocab

    _say(f"[2/6] [{d.clock}] profile with the real OCR (rapidocr, {d.workers} workers)")
    prof = profile(d.pool, workers=d.workers, progress=False)
    for line in prof.line().splitlines()[2:]:
        _say("      " + line.strip())
    dp = deparrot(d.pool, progress=False)  # strip: deterministic, ~1 s per 10k captions
    n = deparrot_counts(d.pool)
    strip = n["modes"].get("strip", 0)  # null captions come only from strip (mode none passes unchanged)
    _say(
        f"      {dp.line()}: {strip} captions spelled their image's text: {strip - n['null']} keep a "
        f"de-parroted caption, {n['null']} are left with nothing describable (null); {n['removed_words']} "
        f"words removed, max residual CoTR {n['max_residual_cotr']:g}"
    )
    voc = vocab(d.pool, top=d.proto.world["sync_words"], stopwords=True, min_len=2)
    d.words = [x for x, _ in voc["caption_1gram"]]
    ev = d.eval_dir
    classnames = (ev / "clean" / "classnames.txt").read_text().split()
    templates = (ev / "clean" / "zeroshot_classification_templates.txt").read_text().splitlines()
    d.vocab_file = d.out / "vocab_texts.txt"
    d.vocab_file.write_text("\n".join(d.words + classnames + templates) + "\n")


def _first_subsets_and_rewrites(d: _Demo):
    """[3/6] The subsets that need no trained model (all, less-is-more), and the LLM caption rewrites when a
    chosen model trains on them."""
    from ..curate.select import select

    _say(f"[3/6] [{d.clock}] subsets and rewrites")
    d.sel = {"all": select(d.pool, "all"), "less-is-more": select(d.pool, "less-is-more")}
    _say("      " + d.sel["less-is-more"].line())
    if any(d.models[m]["rewrites"] for m in d.chosen):
        from ..rewrite import rewrite

        r = rewrite(
            d.pool,
            backend="llama-cpp",
            n_rewrites=d.cfg.rewrite_k,
            seed=d.seed,
            threads=d.workers,
            draws=8,
            max_captions=d.cfg.rewrite_captions or None,
            progress=False,
        )
        _say("      " + r.line())


def _first_models(d: _Demo) -> list[str]:
    """The models whose subsets need no trained model: the baseline among them, which scores the pool."""
    return [m for m in d.chosen if d.models[m]["subset"] in ("all", "less-is-more") and not d.models[m]["rewrites"]]


def _train_first_models(d: _Demo):
    """[4/6] The first round of training: the baseline (and what trains on the same early subsets)."""
    er_note = f", then the ER family and treatments ({', '.join(d.er_runs)})" if d.er_runs else ""
    _say(
        f"[4/6] [{d.clock}] training {', '.join(d.chosen)}: {d.cfg.steps} steps x {d.cfg.batch} samples each, "
        f"{d.workers} at a time{er_note}"
    )
    _train(d, {m: _model_config(d, m) for m in _first_models(d) if not _trained(_run_dir(d, m))})


def _score_and_select(d: _Demo):
    """Score the pool with the baseline (CLIP score, masked CLIP score), cluster and dedup, then the
    subsets that read those columns; parrot-debiased and deparrot share the CLIP-score threshold (the same
    pool quantile), so only their text rule differs."""
    from ..curate.cluster import cluster
    from ..curate.select import select
    from ..engine import run_stage

    pool, sel, cur = d.pool, d.sel, d.proto.curation
    base_ckpt = str(_run_dir(d, "all") / "checkpoints" / "final.pt")
    _say(f"      [{d.clock}] scoring the pool with the baseline model (CLIP score, masked CLIP score)")
    e = run_stage(
        pool,
        "embed",
        {"model": d.train["model"], "pretrained": base_ckpt, "masked": True},
        workers=d.workers,
        batch_size=256,
        progress=False,
    )
    _say("      " + e.line())
    c = cluster(pool, dedup_fraction=cur["dedup_fraction"], progress=False)
    _say("      " + c.line())
    clip_scores = pool.load("embed", columns=["clip_score"])["clip_score"].to_numpy()
    thr = round(float(np.quantile(clip_scores, cur["min_clip_score_quantile"])), 4)
    sel["clip-score"] = select(pool, "clip-score")
    sel["parrot-debiased"] = select(pool, "parrot-debiased", overrides={"min_clip_score": thr})
    sel["deparrot"] = select(pool, "deparrot", overrides={"min_clip_score": thr})
    sel["t-mars"] = select(pool, "t-mars", size_like="less-is-more")
    sel["cotr"] = select(pool, "cotr")
    sel["random"] = select(pool, "random", size_like="parrot-debiased")
    for k in ("clip-score", "parrot-debiased", "t-mars", "cotr", "random", "deparrot"):
        _say("      " + sel[k].line())
    for m in d.chosen:  # a model the protocol adds on another recipe (a built-in name or a recipe YAML)
        r = d.models[m]["subset"]
        if r not in sel:
            sel[r] = select(pool, r)
            _say("      " + sel[r].line())


def _train_other_models(d: _Demo):
    """The second round: every other chosen model, then the ER family and treatments."""
    first = _first_models(d)
    configs = {m: _model_config(d, m) for m in d.chosen if m not in first and not _trained(_run_dir(d, m))}
    for n in d.er_runs:
        if not _trained(d.out / "er" / "runs" / n):
            configs[f"er-{n}"] = _er_config(d, n)
    _train(d, configs)


def _run_dir(d: _Demo, model: str) -> Path:
    return d.out / "runs" / model


def _trained(run: Path) -> bool:
    return (run / "checkpoints" / "final.pt").exists()


def _subset_shards(d: _Demo, name: str, caption_column: str | None = None) -> Path:
    """Reshard a selected subset once (with rewrites when available) for training; with `caption_column`
    each sample's .txt is that column (a folder of its own: the same recipe may train another model on the
    original captions)."""
    from ..curate.reshard import reshard

    folder = d.out / "subsets" / (f"{name}@{caption_column}" if caption_column else name)
    if not (folder / "reshard.json").exists():
        cols = ["rewrites"] if d.pool.done_shards("rewrite") else None
        if folder.exists():
            shutil.rmtree(folder)
        path = d.sel[name].path if name in d.sel else d.pool.subset_path(name)
        reshard(
            d.pool,
            path,
            folder,
            shard_size=d.cfg.shard_size,
            columns=cols,
            progress=False,
            caption_column=caption_column,
        )
    return folder


def _train_config(d: _Demo, data: str, run: Path, steps: int, every: int, **options) -> TrainConfig:
    """One model of the protocol: its settings, `steps` x the batch samples, one thread and no loader
    workers per process (two processes share two cores), and a resume from the latest checkpoint when a
    killed run left one."""
    tr = d.train
    settings = dict(
        train_data=data,
        out=str(run),
        model=tr["model"],
        samples=steps * tr["batch"],
        batch_size=tr["batch"],
        lr=float(tr["lr"]),
        warmup=float(tr["warmup"]),
        weight_decay=float(tr["weight_decay"]),
        init_logit_scale=float(tr["init_logit_scale"]),
        seed=d.seed,
        threads=1,
        loader_workers=0,
        vocab_texts=[str(d.vocab_file)],
        checkpoint_every=every,
        progress=False,
        resume="latest" if (run / "checkpoints" / "latest.pt").exists() else None,
    )
    return TrainConfig.from_dict({**settings, **options})  # the model's own options win, as later flags did


def _model_config(d: _Demo, name: str) -> TrainConfig:
    """A chosen model on its subset's shards (resharded here, once), with the protocol's extra options."""
    m = d.models[name]
    data = str(_subset_shards(d, m["subset"], m["caption_column"]))
    options = {"rewrites": True} if m["rewrites"] else {}
    options.update(train_flag_options(m["train_args"]))
    return _train_config(d, data, _run_dir(d, name), d.cfg.steps, max(100, d.cfg.steps // 6), **options)


def _er_config(d: _Demo, name: str) -> TrainConfig:
    """An ER run on the first shards of its world; a family run keeps every checkpoint (each is a point of
    the family)."""
    r = d.er_runs[name]
    k = r["pairs"] // d.cfg.er["shard_size"]
    data = str(d.er_pools[r["world"]] / "shards" / f"{{{0:05d}..{k - 1:05d}}}.tar")
    options = {"keep_checkpoints": 0} if r["family"] else {}
    return _train_config(d, data, d.out / "er" / "runs" / name, r["steps"], r["checkpoint_every"], **options)


def train_flag_options(flags: list) -> dict:
    """A protocol model's `train_args` (extra `unparrot train` flags) as TrainConfig options, read by the
    CLI's own parser so they mean exactly what they mean on the command line."""
    if not flags:
        return {}
    import dataclasses

    from ..cli import build_parser

    a = build_parser().parse_args(["train", "-", *map(str, flags)])
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("train_data", "progress")]
    return {k: getattr(a, k) for k in names if getattr(a, k, None) is not None}


def _train(d: _Demo, configs: dict[str, TrainConfig]):
    """Train `configs`, `workers` processes at a time (train.launch), logging to OUT/logs/train-<name>.log."""
    from ..train.launch import launch_all

    def started(name):
        _say(f"      [{d.clock}] training {name} ...")

    def finished(name, s, seconds):
        _say(
            f"      [{d.clock}] {name}: {s['steps']} steps in {seconds:.0f}s, final loss {s['loss']:.3f}, "
            f"{s['samples_per_s']:.0f} samples/s"
        )

    (d.out / "logs").mkdir(parents=True, exist_ok=True)
    launch_all(configs, d.workers, logs=d.out / "logs", on_start=started, on_done=finished)


def _evaluate_models(d: _Demo) -> dict | None:
    """[5/6] Every chosen model on the clean, attacked, control and shifted sets (zero-shot) and the Sync
    score; then the ER design when the size runs it (its result, else None)."""
    from ..evaluate import evaluate

    _say(f"[5/6] [{d.clock}] evaluation: zero-shot (clean, attacked, control, shifts), Sync score")
    ev = d.eval_dir
    sets = {
        "clean": ev / "clean",
        "attack": ev / "attack",
        "attack-control": ev / "attack-control",
        **{x: ev / x for x in SHIFTS},
    }
    for m in d.chosen:
        evaluate(
            d.train["model"],
            str(_run_dir(d, m) / "checkpoints" / "final.pt"),
            name=m,
            datasets={k: str(v) for k, v in sets.items()},
            tasks=("zeroshot", "sync"),
            out=d.out / "results",
            sync_words=d.words,
            sync_font_scale=d.proto.world["sync_font_scale"],
            progress=False,
        )
    if d.er_runs:
        return _er_evaluate(d)
    _say(
        "      effective robustness: not run at this size (the protocol's ER design runs at "
        f"{', '.join(k for k, v in d.proto.sizes.items() if v.er) or 'no size'})"
    )
    return None


def _er_evaluate(d: _Demo) -> dict:
    """Every family point (each intermediate and final checkpoint) and treatment on the eval world's ID and
    shifted sets; ER of the treatments against the family's line (`robustness()` is given the family)."""
    from ..evaluate import evaluate, robustness

    er, out = d.proto.er, d.out
    ev = d.er_pools[er["eval_world"]] / "eval"
    sets = {x: str(ev / x) for x in (er["id_set"], *er["shifts"])}
    res = out / "er" / "results"
    points, treatments = [], []
    for name, r in d.er_runs.items():
        ck = out / "er" / "runs" / name / "checkpoints"
        files = sorted(ck.glob("step_*.pt")) + [ck / "final.pt"] if r["family"] else [ck / "final.pt"]
        for f in files:
            label = name if f.name == "final.pt" else f"{name}@{int(f.stem.split('_')[1])}"
            evaluate(d.train["model"], str(f), name=label, datasets=sets, tasks=("zeroshot",), out=res, progress=False)
            (points if r["family"] else treatments).append(label)
    (out / "er" / "points.json").write_text(json.dumps({"family_points": points, "treatments": treatments}))
    family = [n for n in d.er_runs if d.er_runs[n]["family"]]
    _say(
        f"      [{d.clock}] ER: {len(points)} family points ({len(family)} runs "
        f"and their checkpoints), treatments {', '.join(treatments)}"
    )
    return robustness(
        res,
        [er["id_set"]],
        list(er["shifts"]),
        baselines=points,
        models=treatments,
        link=er.get("link", "logit"),
        plot=out / "robustness.png",
    )


def _results(d: _Demo, er: dict | None) -> dict:
    """[6/6] The tables, the protocol's verdicts, the HTML report and OUT/demo.json (the run's record)."""
    from ..protocol import verdict_lines, verdicts
    from ..report import report

    out, cfg, tr = d.out, d.cfg, d.train
    _say(f"[6/6] [{d.clock}] results")
    _say(demo_table(out, d.pool, d.chosen, d.models))
    if er:
        _say(er_table(out, d.proto))
    found = verdicts([out], d.proto)
    _say("findings (protocol verdicts: 95% bootstrap interval over evaluation items; one seed)")
    for line in verdict_lines(found):
        _say(line)
    path = report(
        d.pool,
        out=out / "report.html",
        title=f"unparrot demo ({d.size}, seed {d.seed})",
        results_dir=out / "results",
        model_order=list(d.chosen),
        findings=found,
        robustness_plot=str(out / "robustness.png") if er else None,
        results_note=f"<p class='note'>{cfg.steps} steps x {cfg.batch} samples per model; {tr['model']}; "
        f"seed {d.seed}; {d.note}.</p>",
    )
    summary = {
        "size": d.size,
        "seed": d.seed,
        "protocol": d.proto.path,
        "protocol_sha256": protocol_digest(d.proto.path),
        "findings": found,
        "minutes": round((time.time() - d.clock.t0) / 60, 1),
        "report": str(path),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    _say(f"done in {d.clock}: report {path}")
    return summary
