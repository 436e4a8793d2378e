"""Drop-in with the peers' layouts (issue 16): empty and corrupt shards, relative shard patterns, shard-size
files, the Parrot paper's vocabulary files, and `info` / `select` messages. The real peer tools run in
test_peer_tools.py."""

import csv
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import jpeg_bytes, write_tar
from unparrot.cli import main as cli
from unparrot.engine import run
from unparrot.ingest import ingest
from unparrot.curate.reshard import reshard
from unparrot.pool import Pool, write_subset

ROOT = Path(__file__).parent.parent


def _tar_count(path) -> int:
    """Samples of a tar counted with the standard library (keys of its members)."""
    with tarfile.open(path) as tf:
        return len({m.name.split(".")[0] for m in tf.getmembers() if m.isfile()})


def _with_broken_shards(synth_pool, root) -> Pool:
    """The synthetic pool plus a 0-sample tar (img2dataset's shard whose every URL failed) and a corrupt one."""
    pool = Pool(shutil.copytree(synth_pool, root))
    write_tar(pool.root / "shards" / "00003.tar", [])
    (pool.root / "shards" / "00004.tar").write_bytes(b"this is not a tar file" * 40)
    return pool


def _check_schemas(pool: Pool, stage: str, empty=("00003", "00004")):
    full = pq.read_schema(pool.column_path(stage, "00000"))
    for sid in empty:
        assert pq.read_metadata(pool.column_path(stage, sid)).num_rows == 0
        got = pq.read_schema(pool.column_path(stage, sid))
        assert got.names == full.names, (stage, sid)
        for f in full:
            assert got.field(f.name).type == f.type, (stage, sid, f.name)
        for p in (pool.root / "embeddings" / stage).glob("00000.*.npy"):
            e = np.load(pool.embedding_path(stage, sid, p.name.split(".")[1]))
            assert e.shape == (0, np.load(p).shape[1]), (stage, sid, p.name)


def _ops_over_broken_shards(pool: Pool, engine: str, stages=("inspect", "spot", "parrot", "embed", "aesthetic")):
    """Per-sample stages over a pool with an empty and a corrupt shard: every shard gets the full schema."""
    import torch

    from unparrot.ops.aesthetic import aesthetic_mlp

    kw = {"engine": engine, "workers": 2 if engine == "ray" else 1, "progress": False}
    torch.manual_seed(0)
    weights = pool.root / "mlp.pth"
    torch.save(aesthetic_mlp(128).state_dict(), weights)
    params = {
        "spot": {"backend": "oracle"},
        "embed": {"model": "unparrot-rn-tiny", "masked": True},
        "aesthetic": {"weights": str(weights)},
    }
    for stage in stages:
        s = run(pool, stage, params.get(stage), **kw)  # parrot reads spot's `texts` from the empty shards too
        assert s.n_ok == 300, stage
        _check_schemas(pool, stage)
    assert any("00004" in p for p in pool.errors("spot")["shard"])


def test_empty_and_corrupt_shards_profile_and_select(synth_pool, tmp_path):
    """The issue's failure, fast: `profile` and `select` over an empty and a corrupt shard."""
    from unparrot.curate.select import select
    from unparrot.profile import profile

    pool = _with_broken_shards(synth_pool, tmp_path / "p")
    summary = profile(pool, backend="oracle", workers=1, progress=False)
    assert summary.samples == 300
    for stage in ("spot", "parrot"):
        _check_schemas(pool, stage)
    assert select(pool, "less-is-more").pool_rows == 300


@pytest.mark.slow
def test_empty_and_corrupt_shards_carry_the_stage_schema_local(synth_pool, tmp_path):
    from unparrot.curate.cluster import cluster
    from unparrot.curate.select import select
    from unparrot.profile import summarize

    pool = _with_broken_shards(synth_pool, tmp_path / "p")
    _ops_over_broken_shards(pool, "local")
    cluster(pool, k=3, progress=False)
    _check_schemas(pool, "cluster")
    summary = summarize(pool)  # profile's numbers: stopped with "no column 'texts' (shard 00002)" before
    assert summary.samples == 300
    sel = select(pool, "parrot-debiased", overrides={"min_clip_score": -1.0, "min_aesthetic": -1e9})
    assert sel.pool_rows == 300 and sel.funnel[0]["before"] == 300  # "No match for FieldRef.Name(has_text)" before
    out = reshard(pool, pool.subset_path("parrot-debiased"), pool.root / "out", columns=["has_text"], progress=False)
    assert out.written == len(sel.uids)


@pytest.mark.slow
def test_empty_and_corrupt_shards_carry_the_stage_schema_ray(synth_pool, tmp_path):
    """The Ray engine's own paths: no group for an empty tar, a batch of only a corrupt shard's problem row,
    list columns (spot), inputs read from empty shards (parrot), float columns and embeddings (embed)."""
    pytest.importorskip("ray")
    _ops_over_broken_shards(_with_broken_shards(synth_pool, tmp_path / "p"), "ray", ("spot", "parrot", "embed"))


def test_rewrite_gives_an_empty_shard_its_columns(tmp_path, monkeypatch):
    from helpers import Counting, make_pool
    from unparrot.rewrite import BACKENDS, rewrite

    monkeypatch.setitem(BACKENDS, "counting", Counting)
    Counting.calls, Counting.explode_after = 0, None
    pool = Pool(make_pool(tmp_path / "p", ["a red ball", "blue box"], shards=1))
    write_tar(pool.root / "shards" / "00003.tar", [])
    (pool.root / "shards" / "00004.tar").write_bytes(b"this is not a tar file" * 40)
    assert rewrite(pool, backend="counting", n_rewrites=1, progress=False).n_ok == 2
    _check_schemas(pool, "rewrite")


def test_ingest_resolves_relative_patterns_against_the_current_directory(tmp_path, monkeypatch):
    src = tmp_path / "dl"
    for s in range(2):
        write_tar(src / f"{s:05d}.tar", [(f"{s}a.jpg", jpeg_bytes()), (f"{s}a.txt", f"cap {s}".encode())])
    monkeypatch.chdir(tmp_path)
    for pattern, pool in (("dl/{00000..00001}.tar", "p1"), ("dl/*.tar", "p2"), ("./dl/0000?.tar", "p3")):
        s = ingest(pattern, pool, progress=False)
        assert s.shards == 2, pattern
        assert Path(Pool(pool).config["shards"]).is_absolute()
        monkeypatch.chdir(tmp_path / "dl")  # read from elsewhere, the pool still finds its shards
        assert len(list(Pool(tmp_path / pool).samples())) == 2
        monkeypatch.chdir(tmp_path)
    for bad in ("dl/{00000..00003}.tar", "nowhere/*.tar"):
        with pytest.raises(FileNotFoundError):
            ingest(bad, "bad", progress=False)
        assert not (tmp_path / "bad").exists()  # nothing written, no pool.yaml that reads as 0 shards
    (tmp_path / "existing").mkdir()
    with pytest.raises(FileNotFoundError):
        ingest("nowhere/*.tar", "existing", progress=False)
    assert not (tmp_path / "existing" / "pool.yaml").exists()


def _datacomp_shard_table(folder: Path, shard_format: str, stats_format: str, n: int) -> dict:
    """What DataComp's resharder reads (resharder.py, load_shard_metadata / load_shard_size): the
    `sizes.json` table (shard file name -> int), and for a shard missing from it `{shard}_stats.json`'s
    `successes`, for shard ids 0..n-1 named with --shard-format / --shard-stats-format."""
    table = json.loads((folder / "sizes.json").read_text())
    out = {}
    for i in range(n):
        name = shard_format.format(i)
        if name in table:
            out[name] = int(table[name])
        elif (folder / stats_format.format(i)).exists():
            out[name] = int(json.loads((folder / stats_format.format(i)).read_text())["successes"])
    return out


def _check_size_files(folder: Path):
    tars = sorted(folder.glob("*.tar"))
    assert tars
    truth = {t.name: _tar_count(t) for t in tars}
    table = _datacomp_shard_table(folder, "{:05d}.tar", "{:05d}_stats.json", len(tars))
    assert table == truth
    for t in tars:
        stats = json.loads((folder / f"{t.stem}_stats.json").read_text())
        assert stats["successes"] == stats["count"] == truth[t.name]
    # without sizes.json the resharder takes every shard's _stats.json
    (folder / "sizes.json").rename(folder / "sizes.bak")
    try:
        (folder / "sizes.json").write_text("{}")
        assert _datacomp_shard_table(folder, "{:05d}.tar", "{:05d}_stats.json", len(tars)) == truth
    finally:
        (folder / "sizes.bak").replace(folder / "sizes.json")
    # open_clip_train's own reader of the epoch size (used when --train-num-samples is not given)
    pytest.importorskip("open_clip_train")
    from open_clip_train.data import get_dataset_size

    pattern = str(folder) + "/{%s..%s}.tar" % (tars[0].stem, tars[-1].stem)
    assert get_dataset_size(pattern) == (sum(truth.values()), len(tars))


def test_size_files_from_synth_ingest_and_reshard(synth_pool, tmp_path):
    _check_size_files(Pool(synth_pool).root / "shards")
    table = tmp_path / "t"
    table.mkdir()
    rows = []
    for i in range(7):
        (table / f"{i}.jpg").write_bytes(jpeg_bytes(color=(i * 30, 0, 0)))
        rows.append({"filepath": f"{i}.jpg", "title": f"caption {i}"})
    rows.append({"filepath": "missing.jpg", "title": "x"})  # an error row, in no shard
    with open(table / "t.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["filepath", "title"])
        w.writeheader()
        w.writerows(rows)
    s = ingest(str(table / "t.csv"), tmp_path / "tp", shard_size=3, progress=False)
    assert s.n_written == 7 and s.n_err == 1
    _check_size_files(tmp_path / "tp" / "shards")
    pool = Pool(synth_pool)
    uids = [r["uid"] for r in pool.samples()][::2]
    write_subset(tmp_path / "half.npy", uids)
    reshard(pool, tmp_path / "half.npy", tmp_path / "rs", shard_size=40, progress=False)
    _check_size_files(tmp_path / "rs" / "shards")
    assert sum(json.loads((tmp_path / "rs" / "shards" / "sizes.json").read_text()).values()) == len(uids)


def test_vocab_reads_and_writes_the_parrot_papers_layout(synth_pool, tmp_path):
    import pandas as pd

    from unparrot.profile import read_vocab, vocab

    # the paper's files: pandas' Series.to_csv of word counts (an unnamed index column: header ",count")
    paper = tmp_path / "laion_1gram.csv"
    pd.Series({"sale": 120, "free": 80, "new york": 40}, name="count").to_csv(paper)
    assert paper.read_text().splitlines()[0] == ",count"
    assert read_vocab(paper) == ["sale", "free", "new york"]
    assert read_vocab(paper, top=2) == ["sale", "free"]
    roundtrip = tmp_path / "rt.csv"
    pd.read_csv(paper).to_csv(roundtrip, index=False)  # header "Unnamed: 0,count"
    assert read_vocab(roundtrip) == ["sale", "free", "new york"]
    plain = tmp_path / "plain.txt"
    plain.write_text("alpha\nbeta\n")
    assert read_vocab(plain) == ["alpha", "beta"]
    headerless = tmp_path / "hl.csv"
    headerless.write_text("alpha,3\nbeta,2\n")
    assert read_vocab(headerless) == ["alpha", "beta"]
    pool = Pool(shutil.copytree(synth_pool, tmp_path / "p"))
    assert cli(["vocab", str(pool.root), "--out", str(tmp_path / "v"), "--format", "parrot", "--top", "50"]) == 0
    ours = vocab(pool, out=tmp_path / "u", top=50)
    for name, rows in ours.items():
        if name == "co_emb_1gram":
            continue
        # the Parrot repository's loader (sys_benchmark.py): pd.read_csv(path)['Unnamed: 0'].tolist()
        words = pd.read_csv(tmp_path / "v" / f"{name}.csv")["Unnamed: 0"].tolist()
        assert words == [w for w, _ in rows]
        assert read_vocab(tmp_path / "v" / f"{name}.csv") == words == read_vocab(tmp_path / "u" / f"{name}.csv")
    with pytest.raises(ValueError, match="unknown vocabulary format"):
        vocab(pool, out=tmp_path / "x", format="laion")


def test_info_counts_samples_of_a_fresh_pool(synth_pool, tmp_path, capsys):
    src = tmp_path / "dl"
    write_tar(src / "00000.tar", [(f"k{i}.jpg", jpeg_bytes()) for i in range(3)])
    write_tar(src / "00001.tar", [])
    (src / "00001_stats.json").write_text(json.dumps({"count": 5, "successes": 0}))  # img2dataset's
    ingest(str(src), tmp_path / "p", progress=False)
    assert cli(["info", str(tmp_path / "p")]) == 0
    assert "2 shards, 3 samples" in capsys.readouterr().out
    assert cli(["info", str(synth_pool)]) == 0
    assert "3 shards, 300 samples" in capsys.readouterr().out


def test_select_names_the_command_that_makes_a_missing_column(synth_pool, tmp_path, capsys):
    pool = Pool(shutil.copytree(synth_pool, tmp_path / "p"))
    run(pool, "spot", {"backend": "oracle"}, progress=False)
    assert cli(["select", str(pool.root), "parrot-debiased"]) == 1
    err = capsys.readouterr().err
    assert "clip_score" in err and "unparrot embed" in err
    assert cli(["select", str(pool.root), "cotr"]) == 1
    assert "unparrot profile" in capsys.readouterr().err


def test_export_gives_open_clip_the_same_model_and_tokenizer(synth_pool, tmp_path):
    """A dense-vocabulary checkpoint exported as an open_clip folder: open_clip alone (no unparrot config,
    no dense tokenizer) rebuilds model, transform and tokenizer and computes the same embeddings."""
    import io

    import open_clip
    import torch
    from PIL import Image

    from unparrot.models import build_vocab, export_open_clip, load_clip

    torch.manual_seed(0)
    vocab = build_vocab(["a photo of a ring", "a red disk"])
    ours = load_clip("unparrot-rn-tiny-v1k", vocab=vocab)
    ck = tmp_path / "final.pt"
    torch.save({"name": "unparrot-rn-tiny-v1k", "state_dict": ours.model.state_dict(), "unparrot_vocab": vocab}, ck)
    folder = f"local-dir:{export_open_clip(ck, tmp_path / 'open_clip')}"
    assert cli(["export", str(ck), str(tmp_path / "cli")]) == 0
    assert (
        json.loads((tmp_path / "cli" / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["vocab_size"]
        == 49408
    )
    model, _, preprocess = open_clip.create_model_and_transforms(folder)
    model.eval()
    tok = open_clip.get_tokenizer(folder)
    assert isinstance(tok, open_clip.tokenizer.SimpleTokenizer) and tok.context_length == 32
    texts = ["a photo of a ring", "qwertyuiop zebra", ""]  # in the vocabulary, outside it, empty
    ids = tok(texts)
    assert int(ids.max()) == 49407  # open_clip's BPE ids: "index out of range" in the 1,024-row table before
    with torch.no_grad():
        a, b = ours.model.encode_text(ours.tokenizer(texts)), model.encode_text(ids)
        im = Image.open(io.BytesIO(next(Pool(synth_pool).samples())["image"]))
        x = preprocess(im)[None]
        assert torch.equal(x, ours.preprocess(im)[None])
        ia, ib = ours.model.encode_image(x), model.encode_image(x)
    assert torch.allclose(a, b, rtol=0, atol=1e-6 * float(a.abs().max()))
    assert torch.allclose(ia, ib, rtol=0, atol=1e-6 * float(ia.abs().max()))
    # unparrot loads the folder too, and a checkpoint file over it (open_clip alone ignores `pretrained`)
    again = load_clip(folder)
    with torch.no_grad():
        c = again.model.encode_text(again.tokenizer(texts))
    assert torch.allclose(c, b, rtol=0, atol=1e-6 * float(b.abs().max()))
    zero = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    torch.save({"state_dict": zero}, tmp_path / "zero.pt")
    assert float(load_clip(folder, str(tmp_path / "zero.pt")).model.visual.conv1.weight.detach().abs().sum()) == 0.0


@pytest.mark.slow
def test_import_unparrot_registers_the_model_configs():
    """Both import orders, each in a fresh interpreter (run side by side)."""
    env = {"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    procs = []
    for order in ("unparrot, open_clip", "open_clip, unparrot"):
        code = f"import {order}; print(open_clip.get_model_config('unparrot-rn-tiny-v1k')['text_cfg']['vocab_size'])"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
        )
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == "1024", err[-2000:]
