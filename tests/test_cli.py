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
    assert main(["reshard", str(pool), str(pool / "subsets" / "every.npy"), str(out), "--columns", "rewrites",
                 "--quiet"]) == 0
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
    assert main(["profile", str(pool), "--backend", "oracle", "--workers", "1", "--quiet", "--overwrite",
                 "--parrot-param", "stopwords=true", "--parrot-param", "min_len=3"]) == 0
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



def test_strip_option_handles_both_spellings():
    from unparrot.cli import strip_option

    assert strip_option(["train", "d", "--nproc", "2", "--out", "r"], "--nproc") == ["train", "d", "--out", "r"]
    assert strip_option(["train", "d", "--nproc=2", "--out", "r"], "--nproc") == ["train", "d", "--out", "r"]
    assert strip_option(["train", "--nprocs-x", "1"], "--nproc") == ["train", "--nprocs-x", "1"]
