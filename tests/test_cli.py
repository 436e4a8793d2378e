import os
import subprocess
import sys
from pathlib import Path

import pytest

from unparrot.cli import build_parser, main

ROOT = Path(__file__).parent.parent


def _subcommands():
    p = build_parser()
    return sorted(next(a for a in p._actions if a.dest == "command").choices)


@pytest.mark.parametrize("cmd", _subcommands())
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: unparrot " + cmd) and len(out) > 150


def test_python_dash_m_and_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "unparrot", *a], env=env, capture_output=True, text=True, timeout=300
        )

    r = run(
        "synth",
        str(tmp_path / "p"),
        "-n",
        "120",
        "--preset",
        "learnable",
        "--shard-size",
        "60",
        "--eval-per-class",
        "2",
        "--stats",
        "--quiet",
        "--param",
        "p_sign=0.5",
    )
    assert r.returncode == 0, r.stderr
    assert "images with text" in r.stdout
    r = run("run", str(tmp_path / "p"), "inspect", "--workers", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "120 samples: 120 processed, 0 errors" in r.stdout
    r = run("info", str(tmp_path / "p"))
    assert "inspect" in r.stdout and "120 rows" in r.stdout


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing"), "inspect"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert main(["synth", str(tmp_path / "x"), "--param", "p_text=7"]) == 1
    assert "p_text" in capsys.readouterr().err


def test_rewrite_reshard_train_data_through_the_cli(tmp_path):
    """unparrot rewrite (EDA) -> reshard --columns rewrites -> the training stream samples the rewrites."""
    import json

    import numpy as np

    from unparrot.io.tar import iter_samples
    from unparrot.pool import write_subset
    from unparrot.train.data import SampleMaker

    pool = tmp_path / "p"
    assert main(["synth", str(pool), "-n", "40", "--preset", "learnable", "--eval-per-class", "1", "--quiet"]) == 0
    assert main(["rewrite", str(pool), "--backend", "eda", "-k", "2", "--quiet"]) == 0
    from unparrot.pool import Pool

    df = Pool(pool).load("rewrite", columns=["rewrites"])
    assert len(df) == 40 and df["rewrites"].map(len).sum() > 40
    write_subset(pool / "subsets" / "every.npy", df["uid"].tolist())
    out = tmp_path / "r"
    assert (
        main(["reshard", str(pool), str(pool / "subsets" / "every.npy"), str(out), "--columns", "rewrites", "--quiet"])
        == 0
    )
    metas = [json.loads(s.members["json"]) for t in sorted(out.glob("shards/*.tar")) for s in iter_samples(t)]
    assert len(metas) == 40 and all("rewrites" in m for m in metas)
    row = next(m for m in metas if len(m["rewrites"]) == 2)
    maker = SampleMaker(32, None, use_rewrites=True)
    rng = np.random.default_rng(0)
    seen = {maker.caption({"caption": "the original caption", "meta": row}, rng) for _ in range(200)}
    assert seen == {"the original caption", *row["rewrites"]}


def test_profile_vocab_report_with_cotr_variants_through_the_cli(tmp_path, capsys):
    import pandas as pd

    from unparrot.pool import Pool

    pool = tmp_path / "p"
    assert main(["synth", str(pool), "-n", "60", "--preset", "laion", "--eval-per-class", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["profile", str(pool), "--backend", "oracle", "--workers", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "images with text" in out and "mean CoTR" in out
    plain = Pool(pool).load("parrot")
    assert (
        main(
            [
                "profile",
                str(pool),
                "--backend",
                "oracle",
                "--workers",
                "1",
                "--quiet",
                "--overwrite",
                "--parrot-param",
                "stopwords=true",
                "--parrot-param",
                "min_len=3",
            ]
        )
        == 0
    )
    strict = Pool(pool).load("parrot")
    both = plain.merge(strict, on="uid", suffixes=("", "_strict"))
    # dropping stop words and short tokens changes CoTR on some captions, never the co-embedded long words
    assert (both["cotr"] != both["cotr_strict"]).any()
    assert all(set(s) <= set(p) for p, s in zip(both["co_emb"], both["co_emb_strict"]))
    assert all(len(w) >= 3 for ws in both["co_emb_strict"] for w in ws)
    assert main(["vocab", str(pool), "--stopwords", "--min-len", "2"]) == 0
    v = pd.read_csv(pool / "vocab" / "caption_1gram.csv")
    assert list(v.columns) == ["ngram", "count"] and len(v) > 5 and "the" not in set(v["ngram"])
    assert main(["report", str(pool)]) == 0
    html = (pool / "report.html").read_text()
    assert "Profile: embedded text and parrot captions" in html and "<img" in html


# ---- flags generated from the configs ---------------------------------------------------------------------
def _subparsers():
    p = build_parser()
    return next(a for a in p._actions if a.dest == "command").choices


def test_every_flag_is_a_field_of_its_commands_configs():
    import argparse
    import dataclasses

    from unparrot.cli import commands

    parsers = _subparsers()
    for name, _, _, _, configs in commands():
        fields = {f.name for c in configs for f in dataclasses.fields(c[0] if isinstance(c, tuple) else c)}
        dests = {a.dest for a in parsers[name]._actions if not isinstance(a, argparse._HelpAction)}
        assert dests <= fields, (name, dests - fields)
        for a in parsers[name]._actions:  # flag name = field name (old spellings: hidden aliases)
            long = [s for s in a.option_strings if s.startswith("--")]
            if long and a.help != argparse.SUPPRESS:
                assert "--" + a.dest.replace("_", "-") in long, (name, a.option_strings)


def test_function_defaults_are_the_configs_defaults():
    """Each function's signature defaults read its config, so a default is written once."""
    from unparrot.curate.cluster import ClusterConfig, cluster
    from unparrot.curate.select import SelectConfig, select
    from unparrot.demo import DemoConfig, DemoOptions, demo
    from unparrot.engine import StageConfig, run_stage
    from unparrot.evaluate import EvaluateConfig, evaluate
    from unparrot.evaluate.attack import AttackConfig, build_attack
    from unparrot.evaluate.results import ResultsConfig, results_table
    from unparrot.evaluate.robustness import RobustnessConfig, robustness
    from unparrot.flags import signature_mismatches
    from unparrot.ingest import IngestConfig, ingest
    from unparrot.curate.reshard import ReshardConfig, reshard
    from unparrot.models import ExportConfig, export_open_clip
    from unparrot.ops.aesthetic import Aesthetic, AestheticConfig
    from unparrot.ops.embed import Embed, EmbedConfig
    from unparrot.ops.parrot import Parrot, ParrotConfig
    from unparrot.ops.spot import Spot, SpotConfig
    from unparrot.profile import InfoConfig, ProfileConfig, VocabConfig, pool_info, profile, vocab
    from unparrot.report import ReportConfig, report
    from unparrot.rewrite import RewriteConfig, rewrite
    from unparrot.synth.generate import SynthConfig, synth

    pairs = [
        (synth, SynthConfig),
        (ingest, IngestConfig),
        (reshard, ReshardConfig),
        (cluster, ClusterConfig),
        (select, SelectConfig),
        (profile, ProfileConfig),
        (vocab, VocabConfig),
        (pool_info, InfoConfig),
        (report, ReportConfig),
        (evaluate, EvaluateConfig),
        (build_attack, AttackConfig),
        (results_table, ResultsConfig),
        (robustness, RobustnessConfig),
        (rewrite, RewriteConfig),
        (export_open_clip, ExportConfig),
        (demo, DemoConfig),
        (demo, DemoOptions),
        (run_stage, StageConfig),
        (Embed.__init__, EmbedConfig),
        (Spot.__init__, SpotConfig),
        (Parrot.__init__, ParrotConfig),
        (Aesthetic.__init__, AestheticConfig),
    ]
    for fn, cls in pairs:
        assert signature_mismatches(fn, cls) == [], cls.__name__


def test_unset_flags_leave_the_configs_defaults():
    """A flag not given is None, so the default that applies is the config's (help shows it in [brackets]);
    only the per-sample stage commands' batch size and workers and the demo's flags carry a value."""
    import argparse

    parsers = _subparsers()
    own = {"batch_size", "workers"}
    for name, sp in parsers.items():
        for a in sp._actions:
            if a.option_strings and not isinstance(a, (argparse._HelpAction,)) and name != "demo":
                if a.dest in own and name in ("run", "spot", "parrot", "embed", "aesthetic"):
                    assert a.default is None or isinstance(a.default, int), (name, a.dest)
                    continue
                assert a.default is None, (name, a.dest, a.default)
    src = (ROOT / "src" / "unparrot" / "cli.py").read_text()
    assert src.count("add_argument(") == 1 and 'add_argument("--version"' in src  # no other hand-made flag


def test_old_flag_spellings_are_hidden_aliases(capsys):
    p = build_parser()
    a = p.parse_args(["cluster", "P", "--min-points", "3", "--max-points", "9", "-k", "4"])
    assert (a.min_points_per_centroid, a.max_points_per_centroid, a.k) == (3, 9, 4)
    a = p.parse_args(["attack", "S", "O", "--size", "0.3"])
    assert a.size_frac == 0.3
    a = p.parse_args(["rewrite", "P", "-k", "2", "--param", "n_ctx=512", "--param", "x=true"])
    assert a.n_rewrites == 2 and a.backend_options == [("n_ctx", 512), ("x", True)]
    a = p.parse_args(["select", "P", "all", "--set", "min_clip_score=0.3"])
    assert a.overrides == [("min_clip_score", 0.3)]
    a = p.parse_args(["robustness", "R", "--id", "a,b", "--ood", "c"])
    assert (a.id_sets, a.ood_sets) == (("a", "b"), ("c",))
    a = p.parse_args(["evaluate", "--model", "m", "--dataset", "x=/d/x", "--retrieval", "/d/y", "--batch-size", "8"])
    assert (a.datasets, a.retrieval_sets, a.batch_size) == ([("x", "/d/x")], [("y", "/d/y")], 8)
    a = p.parse_args(["train", "D", "--workers", "0"])
    assert a.loader_workers == 0
    a = p.parse_args(["profile", "P", "--spot-param", "a=1", "--parrot-param", "stopwords=true"])
    assert (a.spot_params, a.parrot_params) == ([("a", 1)], [("stopwords", True)])
    for cmd, old in (
        ("cluster", "--min-points"),
        ("attack", "--size "),
        ("rewrite", "--param"),
        ("select", "--set"),
        ("robustness", "--id "),
        ("train", "--workers"),
    ):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        words = capsys.readouterr().out.replace("[", " ").replace("]", " ").replace(",", " ").split()
        assert old.strip() not in words, (cmd, old)


def test_percent_in_help_is_escaped():
    import argparse
    from dataclasses import dataclass

    from unparrot.flags import add_config_flags, option

    @dataclass
    class C:
        share: float = option(0.5, "keep 50% of the pool (100% = all)")

    sp = argparse.ArgumentParser(prog="x")
    add_config_flags(sp, C)
    assert "keep 50% of the pool (100% = all) [0.5]" in " ".join(sp.format_help().split())


def test_pool_info_counts_shards_stages_and_subsets(tmp_path, capsys):
    from unparrot.engine import run
    from unparrot.pool import Pool, write_subset
    from unparrot.profile import pool_info
    from unparrot.synth.generate import synth

    root = tmp_path / "p"
    synth(root, n=30, preset="learnable", shard_size=10, eval_per_class=1, eval_sets=(), workers=1, progress=False)
    run(root, "inspect", workers=1, progress=False)
    uids = Pool(root).load("inspect", columns=["uid"])["uid"].tolist()
    write_subset(root / "subsets" / "half.npy", uids[:15])
    info = pool_info(root)
    assert (info["shards"], info["samples"], info["subsets"]) == (3, 30, {"half": 15})
    assert info["stages"] == {"inspect": {"done_shards": 3, "rows": 30, "errors": 0, "op": "inspect"}}
    assert "truth" not in info and pool_info(root, truth=True)["truth"]["samples"] == 30
    assert main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "3 shards, 30 samples" in out and "inspect" in out and "3/3 shards, 30 rows, 0 errors" in out
    assert "subset half" in out and "15 uids" in out
