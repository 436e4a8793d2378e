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
Models train two at a time, one per core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .flags import option

SHIFTS = ("shift-background", "shift-sketch", "shift-invert")


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
    size: str = option("default", "a size of the protocol: small (CI check, ~3 min), default (~25 min on 2 cores), "
                       "full (every finding, with the effective-robustness design) or large")
    seed: int = option(0, "seed of the world, the subsets and the training runs")
    workers: int = option(2, "worker processes (stages) and models trained at a time")
    models: list | None = option(None, "comma-separated models to train instead of the size's set (all, clip-score, "
                                 "parrot-debiased, less-is-more, t-mars, cotr, random, laclip, laclip-debiased)",
                                 item=str)


def _say(msg: str):
    print(msg, flush=True)


class Clock:
    def __init__(self):
        self.t0 = time.time()

    def __str__(self):
        s = int(time.time() - self.t0)
        return f"{s // 60:02d}:{s % 60:02d}"


def _train_jobs(jobs: list[tuple[str, list[str], Path]], out: Path, workers: int, clock: Clock):
    """Run training commands (name, argv, run folder), `workers` at a time (one thread each); returns when
    all are done."""
    pending, running = list(jobs), []
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and len(running) < workers:
            name, cmd, run = pending.pop(0)
            log = open(logs / f"train-{name}.log", "w")
            running.append((name, run, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.time()))
            _say(f"      [{clock}] training {name} ...")
        time.sleep(1)
        for item in list(running):
            name, run, p, log, t = item
            if p.poll() is not None:
                log.close()
                running.remove(item)
                if p.returncode:
                    raise RuntimeError(
                        f"training {name} failed (exit {p.returncode}); see {logs / f'train-{name}.log'}"
                    )
                s = json.loads((run / "summary.json").read_text())
                _say(
                    f"      [{clock}] {name}: {s['steps']} steps in {time.time() - t:.0f}s, "
                    f"final loss {s['loss']:.3f}, "
                    f"{s['samples_per_s']:.0f} samples/s"
                )


def _train_argv(data: str, run: Path, steps: int, seed: int, tr: dict, vocab_file: Path, every: int,
                rewrites: bool = False, keep_all: bool = False) -> list[str]:
    """`unparrot train` for one model of the protocol (a killed run resumes from its latest checkpoint)."""
    cmd = [sys.executable, "-m", "unparrot", "train", data, "--out", str(run), "--model", tr["model"],
           "--samples", str(steps * tr["batch"]), "--batch-size", str(tr["batch"]), "--lr", str(tr["lr"]),
           "--warmup", str(tr["warmup"]), "--weight-decay", str(tr["weight_decay"]),
           "--init-logit-scale", str(tr["init_logit_scale"]), "--seed", str(seed), "--threads", "1",
           "--loader-workers", "0", "--vocab-texts", json.dumps([str(vocab_file)]), "--checkpoint-every", str(every),
           "--quiet"]
    if keep_all:
        cmd += ["--keep-checkpoints", "0"]  # every intermediate checkpoint is a point of the ER family
    if rewrites:
        cmd.append("--rewrites")
    if (run / "checkpoints" / "latest.pt").exists():
        cmd += ["--resume", "latest"]
    return cmd


def _trained(run: Path) -> bool:
    return (run / "checkpoints" / "final.pt").exists()


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
    from .protocol import load_protocol, verdict_lines, verdicts

    proto = load_protocol(protocol)
    if size not in proto.sizes:
        raise ValueError(f"unknown demo size {size!r}; one of {', '.join(proto.sizes)}")
    cfg = proto.sizes[size]
    MODELS = proto.models
    chosen = tuple(models) if models else cfg.models
    bad = [m for m in chosen if m not in MODELS]
    if bad:
        raise ValueError(f"unknown demo models {bad}; known: {', '.join(MODELS)}")
    if "all" not in chosen:
        chosen = ("all",) + chosen  # the baseline that scores the pool
    er_runs = proto.er_runs(size)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .curate.cluster import cluster
    from .deparrot import deparrot, deparrot_counts
    from .curate.select import select
    from .engine import run_stage
    from .curate.reshard import reshard
    from .pool import Pool
    from .profile import profile, vocab
    from .synth.generate import synth

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    pool_dir = out / "pool"
    w, tr = proto.world, dict(proto.train, batch=cfg.batch)
    note = f"protocol {proto.name} ({proto.path})"
    _say(f"unparrot demo --size {size} (seed {seed}) -> {out}   {note}")
    _say(f"[1/6] [{clock}] synthetic world: {cfg.n} pairs (preset {w['preset']}) + evaluation sets")
    s = synth(
        pool_dir,
        n=cfg.n,
        preset=w["preset"],
        seed=seed,
        shard_size=cfg.shard_size,
        eval_per_class=cfg.eval_per_class,
        attack_size=w["attack_size"],
        workers=workers,
        progress=False,
    )
    _say(
        f"      {s['samples']} pairs in {s['shards']} shards; {100 * s['share_with_text']:.1f}% with text; "
        f"eval sets: {', '.join(f'{k} ({v})' for k, v in s['eval_sets'].items())}"
    )
    er_pools = _er_worlds(out, proto, cfg, er_runs, seed, workers) if er_runs else {}
    pool = Pool(pool_dir)

    _say(f"[2/6] [{clock}] profile with the real OCR (rapidocr, {workers} workers)")
    prof = profile(pool, workers=workers, progress=False)
    for line in prof.line().splitlines()[2:]:
        _say("      " + line.strip())
    dp = deparrot(pool, progress=False)  # strip: deterministic, ~1 s per 10k captions
    n = deparrot_counts(pool)
    strip = n["modes"].get("strip", 0)  # null captions come only from strip (mode none passes unchanged)
    _say(f"      {dp.line()}: {strip} captions spelled their image's text: {strip - n['null']} keep a "
         f"de-parroted caption, {n['null']} are left with nothing describable (null); {n['removed_words']} "
         f"words removed, max residual CoTR {n['max_residual_cotr']:g}")
    voc = vocab(pool, top=w["sync_words"], stopwords=True, min_len=2)
    words = [x for x, _ in voc["caption_1gram"]]
    ev = pool_dir / "eval"
    vocab_file = out / "vocab_texts.txt"
    classnames = (ev / "clean" / "classnames.txt").read_text().split()
    templates = (ev / "clean" / "zeroshot_classification_templates.txt").read_text().splitlines()
    vocab_file.write_text("\n".join(words + classnames + templates) + "\n")

    def subset(name: str, caption_column: str | None = None) -> Path:
        """Reshard a selected subset once (with rewrites when available) for training; with
        `caption_column` each sample's .txt is that column (a folder of its own: the same recipe may
        train another model on the original captions)."""
        d = out / "subsets" / (f"{name}@{caption_column}" if caption_column else name)
        if not (d / "reshard.json").exists():
            cols = ["rewrites"] if pool.done_shards("rewrite") else None
            if d.exists():
                import shutil

                shutil.rmtree(d)
            path = sel[name].path if name in sel else pool.subset_path(name)
            reshard(pool, path, d, shard_size=cfg.shard_size, columns=cols, progress=False,
                    caption_column=caption_column)
        return d

    def job(name: str):
        run = out / "runs" / name
        argv = _train_argv(str(subset(MODELS[name]["subset"], MODELS[name]["caption_column"])), run, cfg.steps,
                           seed, tr, vocab_file,
                           max(100, cfg.steps // 6), rewrites=MODELS[name]["rewrites"])
        return (name, argv + [str(a) for a in MODELS[name]["train_args"]], run)

    def er_job(name: str):
        r = er_runs[name]
        run = out / "er" / "runs" / name
        k = r["pairs"] // cfg.er["shard_size"]
        data = str(er_pools[r["world"]] / "shards" / f"{{{0:05d}..{k - 1:05d}}}.tar")
        return (f"er-{name}", _train_argv(data, run, r["steps"], seed, tr, vocab_file, r["checkpoint_every"],
                                          keep_all=r["family"]), run)

    _say(f"[3/6] [{clock}] subsets and rewrites")
    sel = {"all": select(pool, "all"), "less-is-more": select(pool, "less-is-more")}
    _say("      " + sel["less-is-more"].line())
    if any(MODELS[m]["rewrites"] for m in chosen):
        from .rewrite import rewrite

        r = rewrite(
            pool,
            backend="llama-cpp",
            n_rewrites=cfg.rewrite_k,
            seed=seed,
            threads=workers,
            draws=8,
            max_captions=cfg.rewrite_captions or None,
            progress=False,
        )
        _say("      " + r.line())

    er_note = f", then the ER family and treatments ({', '.join(er_runs)})" if er_runs else ""
    _say(
        f"[4/6] [{clock}] training {', '.join(chosen)}: {cfg.steps} steps x {cfg.batch} samples each, "
        f"{workers} at a time{er_note}"
    )
    first = [m for m in chosen if MODELS[m]["subset"] in ("all", "less-is-more") and not MODELS[m]["rewrites"]]
    _train_jobs([job(m) for m in first if not _trained(out / "runs" / m)], out, workers, clock)

    base_ckpt = str(out / "runs" / "all" / "checkpoints" / "final.pt")
    _say(f"      [{clock}] scoring the pool with the baseline model (CLIP score, masked CLIP score)")
    e = run_stage(
        pool,
        "embed",
        {"model": tr["model"], "pretrained": base_ckpt, "masked": True},
        workers=workers,
        batch_size=256,
        progress=False,
    )
    _say("      " + e.line())
    c = cluster(pool, dedup_fraction=proto.curation["dedup_fraction"], progress=False)
    _say("      " + c.line())
    clip_scores = pool.load("embed", columns=["clip_score"])["clip_score"].to_numpy()
    thr = float(np.quantile(clip_scores, proto.curation["min_clip_score_quantile"]))
    sel["clip-score"] = select(pool, "clip-score")
    sel["parrot-debiased"] = select(pool, "parrot-debiased", overrides={"min_clip_score": round(thr, 4)})
    # the same CLIP-score threshold (of the original caption) and dedup, so only the text rule differs
    sel["deparrot"] = select(pool, "deparrot", overrides={"min_clip_score": round(thr, 4)})
    sel["t-mars"] = select(pool, "t-mars", size_like="less-is-more")
    sel["cotr"] = select(pool, "cotr")
    sel["random"] = select(pool, "random", size_like="parrot-debiased")
    for k in ("clip-score", "parrot-debiased", "t-mars", "cotr", "random", "deparrot"):
        _say("      " + sel[k].line())
    for m in chosen:  # a model the protocol adds on another recipe (a built-in name or a recipe YAML)
        r = MODELS[m]["subset"]
        if r not in sel:
            sel[r] = select(pool, r)
            _say("      " + sel[r].line())
    rest = [job(m) for m in chosen if m not in first and not _trained(out / "runs" / m)]
    rest += [er_job(n) for n in er_runs if not _trained(out / "er" / "runs" / n)]
    _train_jobs(rest, out, workers, clock)

    _say(f"[5/6] [{clock}] evaluation: zero-shot (clean, attacked, control, shifts), Sync score")
    from .evaluate import evaluate

    sets = {
        "clean": ev / "clean",
        "attack": ev / "attack",
        "attack-control": ev / "attack-control",
        **{x: ev / x for x in SHIFTS},
    }
    for m in chosen:
        evaluate(
            tr["model"],
            str(out / "runs" / m / "checkpoints" / "final.pt"),
            name=m,
            datasets={k: str(v) for k, v in sets.items()},
            tasks=("zeroshot", "sync"),
            out=out / "results",
            sync_words=words,
            sync_font_scale=w["sync_font_scale"],
            progress=False,
        )
    er = _er_evaluate(out, proto, er_runs, er_pools, tr["model"], clock) if er_runs else None
    if not er_runs:
        _say("      effective robustness: not run at this size (the protocol's ER design runs at "
             f"{', '.join(k for k, v in proto.sizes.items() if v.er) or 'no size'})")

    _say(f"[6/6] [{clock}] results")
    _say(demo_table(out, pool, chosen, MODELS))
    if er:
        _say(er_table(out, proto))
    found = verdicts([out], proto)
    _say("findings (protocol verdicts: 95% bootstrap interval over evaluation items; one seed)")
    for line in verdict_lines(found):
        _say(line)
    from .report import report

    path = report(
        pool,
        out=out / "report.html",
        title=f"unparrot demo ({size}, seed {seed})",
        results_dir=out / "results",
        model_order=list(chosen),
        findings=found,
        robustness_plot=str(out / "robustness.png") if er else None,
        results_note=f"<p class='note'>{cfg.steps} steps x {cfg.batch} samples per model; {tr['model']}; "
        f"seed {seed}; {note}.</p>",
    )
    summary = {
        "size": size,
        "seed": seed,
        "protocol": proto.path,
        "protocol_sha256": _digest(proto.path),
        "findings": found,
        "minutes": round((time.time() - clock.t0) / 60, 1),
        "report": str(path),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    _say(f"done in {clock}: report {path}")
    return summary


def _digest(path: str) -> str:
    """The protocol file's digest: runs pooled by --summarize must have been run under the same protocol."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _er_worlds(out: Path, proto, cfg, runs: dict, seed: int, workers: int) -> dict:
    """The ER worlds (learnable preset + the protocol's parameters): one pool per world, as large as its
    largest run (smaller runs train on its first shards); evaluation sets only for the eval world."""
    from .synth.generate import synth

    er, sc = proto.er, cfg.er
    pools = {}
    for name, params in er["worlds"].items():
        used = [r["pairs"] for r in runs.values() if r["world"] == name]
        if not used:
            continue
        d = out / "er" / "pools" / name
        evals = (er["id_set"], *er["shifts"]) if name == er["eval_world"] else ()
        s = synth(d, n=max(used), preset=proto.world["preset"], seed=seed, shard_size=sc["shard_size"],
                  eval_per_class=sc["eval_per_class"], eval_sets=evals, attack_size=proto.world["attack_size"],
                  workers=workers, progress=False, **params)
        ev = f"; eval sets: {', '.join(f'{k} ({v})' for k, v in s['eval_sets'].items())}" if evals else ""
        _say(f"      ER world {name}: {s['samples']} pairs ({', '.join(f'{k}={v}' for k, v in params.items())}){ev}")
        pools[name] = d
    return pools


def _er_evaluate(out: Path, proto, runs: dict, pools: dict, model: str, clock) -> dict:
    """Every family point (each intermediate and final checkpoint) and treatment on the eval world's ID and
    shifted sets; ER of the treatments against the family's line (`robustness()` is given the family)."""
    from .evaluate import evaluate, robustness

    er = proto.er
    ev = pools[er["eval_world"]] / "eval"
    sets = {x: str(ev / x) for x in (er["id_set"], *er["shifts"])}
    res = out / "er" / "results"
    points, treatments = [], []
    for name, r in runs.items():
        ck = out / "er" / "runs" / name / "checkpoints"
        files = sorted(ck.glob("step_*.pt")) + [ck / "final.pt"] if r["family"] else [ck / "final.pt"]
        for f in files:
            label = name if f.name == "final.pt" else f"{name}@{int(f.stem.split('_')[1])}"
            evaluate(model, str(f), name=label, datasets=sets, tasks=("zeroshot",), out=res, progress=False)
            (points if r["family"] else treatments).append(label)
    (out / "er" / "points.json").write_text(json.dumps({"family_points": points, "treatments": treatments}))
    _say(f"      [{clock}] ER: {len(points)} family points ({len([n for n in runs if runs[n]['family']])} runs "
         f"and their checkpoints), treatments {', '.join(treatments)}")
    return robustness(res, [er["id_set"]], list(er["shifts"]), baselines=points, models=treatments,
                      link=er.get("link", "logit"), plot=out / "robustness.png")


COLUMNS = {  # table heading -> (task, dataset, metric); "shift" is averaged over the shifts
    "clean acc": ("zeroshot", "clean", "acc1"),
    "attacked acc": ("zeroshot", "attack", "acc1"),
    "attack success": ("zeroshot", "attack", "attack_success_rate"),
    "control acc": ("zeroshot", "attack-control", "acc1"),
    "Sync gap": ("sync", "rendered-vocab", "sync_gap"),
    "read top-1": ("sync", "rendered-vocab", "read_top1"),
    "shift acc (mean)": None,
}


def model_numbers(out: Path) -> dict[str, dict[str, float]]:
    """The findings' numbers per model of one demo run, read from its results/ (nan where missing)."""
    from .evaluate.results import read_results

    nan = float("nan")
    by = {(r["model"], r["task"], r["dataset"]): r["metrics"] for r in read_results(Path(out) / "results")}
    res = {}
    for m in dict.fromkeys(mm for mm, _, _ in by):
        row = {k: by.get((m, *v[:2]), {}).get(v[2], nan) for k, v in COLUMNS.items() if v}
        row["shift acc (mean)"] = float(np.mean([by.get((m, "zeroshot", d), {}).get("acc1", nan) for d in SHIFTS]))
        res[m] = row
    return res


def _fmt(k: str, v: float) -> str:
    return f"{v:+.4f}" if k.startswith("ER") else f"{v:.4f}" if k == "Sync gap" else f"{v:.3f}"


def demo_table(out: Path, pool, chosen, models: dict) -> str:
    """The findings' numbers, one row per model (markdown)."""
    nums = model_numbers(out)
    rows = ["| model | train subset | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for m in chosen:
        recipe = models[m]["subset"]
        meta = pool.subset_path(recipe).with_suffix(".json")
        kept = json.loads(meta.read_text())["kept"] if meta.exists() else ""
        subset = f"{recipe} ({kept})" + (" + rewrites" if models[m]["rewrites"] else "")
        if models[m].get("caption_column"):
            subset += f", captions: {models[m]['caption_column']}"
        vals = [_fmt(k, nums.get(m, {}).get(k, float("nan"))) for k in COLUMNS]
        rows.append("| " + " | ".join([m, subset, *vals]) + " |")
    return "\n".join(rows)


def er_table(out: Path, proto) -> str:
    """ER treatments and the family's final models: accuracy on the ID set and each shift, ER per shift."""
    from .evaluate.results import read_results

    er = proto.er
    by = {(r["model"], r["task"], r["dataset"]): r["metrics"] for r in read_results(Path(out) / "er" / "results")}
    names = list(er["family"]) + list(er["treatments"])
    head = [f"{er['id_set']} acc"] + [f"{x} acc" for x in er["shifts"]] + [f"ER {x}" for x in er["shifts"]]
    rows = ["| ER model | role | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    key = "+".join([er["id_set"]]) + "__" + "+".join(er["shifts"])
    for m in names:
        accs = [by.get((m, "zeroshot", d), {}).get("acc1", float("nan")) for d in [er["id_set"], *er["shifts"]]]
        e = by.get((m, "robustness", key), {}).get("effective_robustness", {})
        ers = [e.get(f"{er['id_set']}->{x}", float("nan")) for x in er["shifts"]]
        role = "family" if m in er["family"] else "treatment"
        rows.append(f"| {m} | {role} | " + " | ".join([f"{a:.3f}" for a in accs] + [
            "" if np.isnan(x) else f"{x:+.4f}" for x in ers]) + " |")
    return "\n".join(rows)


def seeds_summary(outs: list[str | os.PathLike], protocol: str | None = None) -> str:
    """Over several demo runs (one per seed): mean ± std of the numbers, and every finding's pooled verdict
    (hierarchical bootstrap: seeds, then images), also over the seeds not used to choose settings."""
    from .protocol import load_protocol, verdict_lines, verdicts

    outs = [Path(o) for o in outs]
    runs = [model_numbers(o) for o in outs]
    metas = [json.loads((o / "demo.json").read_text()) if (o / "demo.json").exists() else {} for o in outs]
    proto = load_protocol(protocol or next((m["protocol"] for m in metas if m.get("protocol")), "demo"))
    order = list(proto.models)
    models = sorted(dict.fromkeys(m for r in runs for m in r), key=lambda m: (order.index(m) if m in order else 99, m))
    lines = [f"{len(outs)} runs: {', '.join(str(o) for o in outs)}; protocol {proto.name} ({proto.path})", ""]
    shas = {m.get("protocol_sha256") for m in metas} - {None}
    if len(shas) > 1 or (shas and _digest(proto.path) not in shas):
        lines[-1:] = ["WARNING: these runs were made under different versions of the protocol file (see its "
                      "`changes`); their pooled verdicts mix protocols", ""]
    lines += ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for m in models:
        cells = []
        for k in COLUMNS:
            v = np.array([r[m][k] for r in runs if m in r], float)
            cells.append(f"{_fmt(k, v.mean())} ± {_fmt(k, v.std(ddof=1) if len(v) > 1 else 0.0).lstrip('+')}")
        n = sum(m in r for r in runs)
        lines.append(f"| {m}{'' if n == len(runs) else f' ({n} runs)'} | " + " | ".join(cells) + " |")
    lines += ["", f"pooled verdicts over {len(outs)} runs (95% hierarchical bootstrap: seeds, then items):"]
    lines += verdict_lines(verdicts(outs, proto))
    first = int(proto.verdict.get("report_seeds_from", 0))
    fresh = [o for o, m in zip(outs, metas) if m.get("seed", -1) >= first]
    if first and proto.chosen_on_results and len(fresh) < len(outs):
        lines += ["", f"over the seeds >= {first} only (settings were chosen on earlier seeds; "
                  "protocols/demo.yaml `chosen_on_results`):"]
        lines += verdict_lines(verdicts(fresh, proto)) if fresh else ["  no such run among these"]
    return "\n".join(lines)
