"""Regression tests for the defects issue 12 found by probing (each fails without its fix), and the
crash-resume checks: a run killed just before its n-th rename (seeded n), rerun, equals an uninterrupted
run file for file. docs/reliability.md lists which test checks which guarantee."""

import errno
import json
import shutil
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import jpeg_bytes
from helpers import KILLED, count_renames, count_temp_files, kill_points, run_killed, tree_bytes
from unparrot.cli import main
from unparrot.curate.cluster import cluster
from unparrot.curate.select import select
from unparrot.engine import run_stage
from unparrot.pool import Pool, read_subset, u8_to_uids
from unparrot.verify import verify


def _columns_pool(root, n=60, lost=(7,)):
    """A pool of columns only: spot has every sample, embed and parrot lost the samples `lost` (an error
    there, e.g. a caption that is not UTF-8), cluster runs over embed."""
    rng = np.random.default_rng(0)
    (root / "shards").mkdir(parents=True)
    pool = Pool(root)
    uids = [f"{i:032x}" for i in range(n)]
    has = np.arange(n) % 3 == 0
    vecs = rng.normal(size=(n, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for sid, sl in (("a", slice(0, n // 2)), ("b", slice(n // 2, None))):
        idx = np.arange(n)[sl]
        ok = np.array([i for i in idx if i not in lost])
        u = [uids[i] for i in idx]
        pool.write_columns("spot", sid, {"uid": u, "key": u, "has_text": has[idx], "text_area": has[idx] * 0.2})
        errs = [{"uid": uids[i], "key": uids[i], "reason": "caption is not UTF-8"} for i in idx if i in lost]
        v = [uids[i] for i in ok]
        pool.write_columns("embed", sid, {"uid": v, "key": v, "clip_score": ok / n, "image": vecs[ok]}, errs)
        pool.write_columns("parrot", sid, {"uid": v, "key": v, "cotr": np.where(has[ok], 0.5, 0.0)}, errs)
    for st in ("spot", "parrot", "embed"):
        (root / "columns" / st / "_stage.json").write_text(json.dumps({"op": st}))
    return pool, uids, has


# ---- select -------------------------------------------------------------------------------------
def test_select_over_stages_holding_different_rows(tmp_path):
    """Regression: select loaded has_text over spot's rows and indexed it with a mask over the recipe's rows
    (IndexError: boolean index did not match) once one sample was a row in spot and an error in embed."""
    pool, uids, has = _columns_pool(tmp_path / "p")
    sel = select(pool, "clip-score", overrides={"fraction": 0.5})
    assert sel.pool_rows == 59 and len(sel.uids) == 30
    stats = json.loads(pool.subset_path("clip-score").with_suffix(".json").read_text())
    rows = [i for i in range(60) if i != 7]
    assert stats["share_with_text_pool"] == pytest.approx(has[rows].mean())
    kept = {int(u, 16) for u in sel.uids}
    assert stats["share_with_text_subset"] == pytest.approx(has[sorted(kept)].mean())
    assert verify(pool).ok, verify(pool).line()


def test_select_writes_its_subset_only_complete(tmp_path, monkeypatch):
    """Regression: the subset .npy (what reshard reads) was written before the funnel, so a select that
    failed after it left a subset without its .json. Now everything is computed first, the .npy last."""
    pool, _, _ = _columns_pool(tmp_path / "p", lost=())

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("unparrot.curate.select.atomic_write_bytes", full_disk)
    with pytest.raises(OSError, match="No space"):
        select(pool, "clip-score")
    assert not pool.subset_path("clip-score").exists()


def test_select_refuses_an_incomplete_stage(tmp_path):
    """Regression: a stage with output for some shards only (killed, or run on a few) was used, and its
    missing rows counted as removed by the recipe's conditions."""
    pool, _, _ = _columns_pool(tmp_path / "p", lost=())
    pool.column_path("parrot", "b").unlink()
    with pytest.raises(RuntimeError, match="'parrot' is incomplete: no output for 1 of 2 shards"):
        select(pool, "cotr")
    assert not pool.subset_path("cotr").exists()
    assert "incomplete" in verify(pool).line()


def test_killed_select_leaves_nothing_half_made(tmp_path):
    pool, _, _ = _columns_pool(tmp_path / "p", lost=())
    clean = tmp_path / "clean"
    shutil.copytree(pool.root, clean)
    select(Pool(clean), "clip-score")
    assert count_renames(lambda: select(Pool(shutil.copytree(pool.root, tmp_path / "count")), "clip-score")) == 2
    for n in (1, 2):
        p = shutil.copytree(pool.root, tmp_path / f"k{n}")
        assert run_killed(lambda p=p: select(Pool(p), "clip-score"), n) == KILLED
        assert list((p / "subsets").glob(".*.tmp"))  # the kill left a finished temp file
        assert not (p / "subsets" / "clip-score.npy").exists()  # but no subset without its funnel
        select(Pool(p), "clip-score")
        assert tree_bytes(p / "subsets", skip=("clip-score.json",)) == tree_bytes(
            clean / "subsets", skip=("clip-score.json",)
        )
        assert verify(Pool(p)).ok


# ---- whole-pool stages --------------------------------------------------------------------------
def _cluster_k(root):
    """(k of columns/cluster/_stage.json, number of centroids in cluster/cluster/), None where absent."""
    stage, model = root / "columns" / "cluster" / "_stage.json", root / "cluster" / "cluster" / "centroids.npy"
    return (
        json.loads(stage.read_text())["params"]["k"] if stage.exists() else None,
        len(np.load(model)) if model.exists() else None,
    )


def _cluster_model(root):
    """The arrays of cluster/cluster/ (pca.npz's zip headers hold the time of writing, so not its bytes)."""
    d = root / "cluster" / "cluster"
    z = np.load(d / "pca.npz")
    return {"centroids": np.load(d / "centroids.npy").tolist(), **{f: z[f].tolist() for f in z.files}}


def test_cluster_is_all_or_nothing(tmp_path):
    """Regression: cluster killed after some shards left them next to shards of the previous run (two k),
    with the old _stage.json; now the stage is built aside and swapped in whole. Regression too: the PCA
    and centroids were written into the live cluster/<stage>/ before the stage was swapped in, so a kill
    left centroids of the new k beside the stage of the old one; now they swap in with it: at every kill
    point the two agree (or one is missing, mid-swap), and the rerun makes both the new run's."""
    pool, _, _ = _columns_pool(tmp_path / "p")
    cluster(pool, k=3, niter=3, progress=False)
    before = tree_bytes(pool.root / "columns" / "cluster")
    total = count_renames(
        lambda: cluster(Pool(shutil.copytree(pool.root, tmp_path / "c")), k=4, niter=3, progress=False)
    )
    want = tree_bytes(tmp_path / "c" / "columns" / "cluster"), _cluster_model(tmp_path / "c")
    for n in range(1, total + 1):
        p = shutil.copytree(pool.root, tmp_path / f"k{n}")
        assert run_killed(lambda p=p: cluster(Pool(p), k=4, niter=3, progress=False), n) == KILLED
        now = tree_bytes(p / "columns" / "cluster") if (p / "columns" / "cluster").exists() else None
        assert now in (before, None) or json.loads(now["_stage.json"])["params"]["k"] == 4
        if now is not None and now != before:  # killed after the swap: the new stage is whole
            assert {
                int(pq.read_table(p / "columns" / "cluster" / f).column("cluster").to_numpy().max()) < 4
                for f in ("a.parquet", "b.parquet")
            } == {True}
        stage_k, model_k = _cluster_k(p)
        assert None in (stage_k, model_k) or stage_k == model_k, (n, stage_k, model_k)
        cluster(Pool(p), k=4, niter=3, progress=False)
        assert (tree_bytes(p / "columns" / "cluster"), _cluster_model(p)) == want
        assert sorted(f.name for f in (p / "cluster").iterdir()) == ["cluster"]  # nothing left aside
        assert verify(p).ok, verify(p).line()
    assert total >= 4


def test_stage_rerun_removes_temp_files_of_a_killed_run(synth_pool, tmp_path):
    """Regression: a run killed between a temp file and its rename left `.*.tmp` files that no rerun
    removed (docs promise exactly the files of an uninterrupted run). Seeded kill points over every rename."""
    clean = shutil.copytree(synth_pool, tmp_path / "clean")
    run_stage(clean, "inspect", progress=False)
    want = {d: tree_bytes(clean / d / "inspect") for d in ("columns", "errors")}
    total = count_renames(lambda: run_stage(shutil.copytree(synth_pool, tmp_path / "c"), "inspect", progress=False))
    temps = count_temp_files(lambda: run_stage(shutil.copytree(synth_pool, tmp_path / "t"), "inspect", progress=False))
    points = [(n, "replace") for n in kill_points(total, 3, seed=12)]
    points += [(n, "mkstemp") for n in kill_points(temps, 2, seed=13)]  # in the middle of a write
    for n, at in points:
        p = shutil.copytree(synth_pool, tmp_path / f"k{n}{at}")
        assert run_killed(lambda p=p: run_stage(p, "inspect", progress=False), n, at) == KILLED
        assert list(p.rglob(".*.tmp"))
        assert not verify(p).ok  # the temp file is named
        run_stage(p, "inspect", progress=False)
        assert {d: tree_bytes(p / d / "inspect") for d in ("columns", "errors")} == want
        assert not list(p.rglob(".*.tmp")) and verify(p).ok, verify(p).line()


# ---- reshard ------------------------------------------------------------------------------------
def test_reshard_resumes_after_a_kill_and_train_refuses_it_unfinished(synth_pool, tmp_path):
    """Regression: after a kill the rerun refused (`already holds shards`) while the partial folder was
    accepted by train. Now the reshard is written aside and moved into place complete; train refuses an
    unfinished one; a rerun finishes it (also when killed while moving it into place)."""
    from unparrot.curate.reshard import reshard
    from unparrot.train.data import resolve_shards
    from unparrot.pool import write_subset

    pool = Pool(synth_pool)
    sub = tmp_path / "sub.npy"
    write_subset(sub, [r["uid"] for r in pool.samples()][::2])
    reshard(pool, sub, tmp_path / "clean", shard_size=40, progress=False)
    want = tree_bytes(tmp_path / "clean", skip=("reshard.json",))
    total = count_renames(lambda: reshard(pool, sub, tmp_path / "count", shard_size=40, progress=False))
    assert total >= 6
    for n in sorted(set(kill_points(total, 3, seed=4)) | {total - 1, total}):  # also inside the final moves
        out = tmp_path / f"k{n}"
        assert run_killed(lambda out=out: reshard(pool, sub, out, shard_size=40, progress=False), n) == KILLED
        with pytest.raises(RuntimeError, match="did not finish"):
            resolve_shards(str(out))
        assert not verify(out).ok if (out / "shards").exists() else True
        s = reshard(pool, sub, out, shard_size=40, progress=False)
        assert s.written == 150
        assert tree_bytes(out, skip=("reshard.json",)) == want
        assert len(resolve_shards(str(out))) == 4 and verify(out).ok, verify(out).line()
    with pytest.raises(FileExistsError):
        reshard(pool, sub, tmp_path / "clean", progress=False)


# ---- repaired shards, profile counts ------------------------------------------------------------
def test_a_repaired_shard_is_processed_again(synth_pool, tmp_path):
    """Regression: after a truncated shard was restored, the rerun said it was done and its samples stayed
    unprocessed. The column file records the shard's size and mtime; a changed shard is done again."""
    p = shutil.copytree(synth_pool, tmp_path / "p")
    shard = sorted((p / "shards").glob("*.tar"))[1]
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 3])
    s1 = run_stage(p, "inspect", progress=False)
    assert s1.n_in < 300
    assert "changed after" not in verify(p).line()
    shard.write_bytes(good)
    assert "changed after this output was made" in verify(p).line()
    s2 = run_stage(p, "inspect", progress=False)
    assert s2.skipped == 2 and s2.n_in == 300 and s2.n_ok == 300
    assert verify(p).ok, verify(p).line()


def test_profile_counts_a_bad_sample_once(tmp_path):
    """Regression: a sample spot could not read is also an error row of parrot; the summary counted 2."""
    from unparrot.profile import summarize

    (tmp_path / "shards").mkdir()
    pool = Pool(tmp_path)
    u = [f"{i:032x}" for i in range(3)]
    bad = [{"uid": u[2], "key": "k2", "reason": "cannot decode image"}]
    pool.write_columns(
        "spot", "a", {"uid": u[:2], "key": ["k0", "k1"], "has_text": [True, False], "text_area": [0.1, 0.0]}, bad
    )
    pool.write_columns(
        "parrot",
        "a",
        {"uid": u[:2], "key": ["k0", "k1"], "cotr": [1.0, 0.0], "co_emb": [["x"], []]},
        [{**bad[0], "reason": "no 'spot' output for this sample (see errors/spot)"}],
    )
    s = summarize(pool)
    assert s.samples == 2 and s.errors == 1


# ---- ingest -------------------------------------------------------------------------------------
def test_ingest_refuses_non_text_captions_and_paths_outside_the_root(tmp_path):
    """Regression: list or float captions became their string form ("[1, 2]"), and a JSONL image path
    `../../secret.jpg` was copied into a shard. Both are now error rows; a root the user names admits it."""
    from unparrot.ingest import ingest

    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "secret.jpg").write_bytes(jpeg_bytes((0, 0, 255)))
    rows = [
        {"filepath": "ok.jpg", "caption": "a red square"},
        {"filepath": "ok.jpg", "caption": [1, 2]},
        {"filepath": "ok.jpg", "caption": 3.5},
        {"filepath": "../secret.jpg", "caption": "outside"},
        {"filepath": str(tmp_path / "secret.jpg"), "caption": "absolute, outside"},
    ]
    (data / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = ingest(str(data / "t.jsonl"), tmp_path / "pool", progress=False)
    assert (s.n_in, s.n_written, s.n_err) == (5, 1, 4)
    reasons = Pool(tmp_path / "pool").errors("ingest")["reason"].tolist()
    assert sum("is a list, not text" in r for r in reasons) == 1 and sum("is a float" in r for r in reasons) == 1
    assert sum("outside the image root" in r for r in reasons) == 2
    wide = ingest(str(data / "t.jsonl"), tmp_path / "pool2", image_root=str(tmp_path), progress=False)
    assert wide.n_written == 1  # relative paths now resolve under tmp_path: only the absolute one is there
    (data / "u.jsonl").write_text(json.dumps({"filepath": str(tmp_path / "secret.jpg"), "caption": "x"}) + "\n")
    assert ingest(str(data / "u.jsonl"), tmp_path / "pool3", image_root=str(tmp_path), progress=False).n_written == 1


# ---- one-line errors ----------------------------------------------------------------------------
def _one_line(capsys, argv, *expect):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    for e in expect:
        assert e in err, err
    return err


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """Regression: OSError (read-only folder, full disk), ConnectionError, a garbage or empty --pretrained
    and YAML errors ended in tracebacks."""
    import socket

    pool = tmp_path / "p"
    assert main(["synth", str(pool), "-n", "20", "--preset", "learnable", "--eval-per-class", "1", "--quiet"]) == 0
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04not a pickle at all" * 10)
    (tmp_path / "empty.pt").write_bytes(b"")
    for ck in ("garbage.pt", "empty.pt"):
        _one_line(
            capsys,
            [
                "embed",
                str(pool),
                "--model",
                "unparrot-rn-tiny",
                "--pretrained",
                str(tmp_path / ck),
                "--workers",
                "1",
                "--quiet",
            ],
            "unparrot embed: error:",
        )
    (tmp_path / "bad.yaml").write_text("name: x\nwhere: [has_text ==\n")
    _one_line(capsys, ["select", str(pool), str(tmp_path / "bad.yaml")], "unparrot select: error:")
    (tmp_path / "evil.yaml").write_text("name: !!python/object/apply:os.system ['echo pwned']\nwhere: []\n")
    _one_line(capsys, ["select", str(pool), str(tmp_path / "evil.yaml")], "python/object")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    _one_line(
        capsys,
        ["rewrite", str(pool), "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1", "--quiet"],
        "cannot list the models",
    )

    real = tempfile.mkstemp

    def fail(errno_, text):
        def mkstemp(*a, **k):
            raise OSError(errno_, text, k.get("dir", "?"))

        return mkstemp

    for code, text in ((errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left on device")):
        monkeypatch.setattr(tempfile, "mkstemp", fail(code, text))
        _one_line(capsys, ["run", str(pool), "inspect", "--workers", "1", "--quiet", "--overwrite"], text)
        _one_line(capsys, ["rewrite", str(pool), "--backend", "eda", "--quiet"], text)
    monkeypatch.setattr(tempfile, "mkstemp", real)


@pytest.mark.slow
def test_train_on_an_empty_tar_fails_in_one_line(tmp_path, capsys):
    """Regression: the data worker's whole traceback was inside the error message."""
    import tarfile

    (tmp_path / "d" / "shards").mkdir(parents=True)
    tarfile.open(tmp_path / "d" / "shards" / "00000.tar", "w").close()
    err = _one_line(
        capsys,
        [
            "train",
            str(tmp_path / "d"),
            "--out",
            str(tmp_path / "run"),
            "--model",
            "unparrot-vit-tiny",
            "--samples",
            "32",
            "--batch-size",
            "16",
            "--workers",
            "1",
            "--quiet",
        ],
        "in a data worker: no readable samples",
    )
    assert "Original Traceback" not in err


# ---- verify -------------------------------------------------------------------------------------
def test_verify_names_every_inconsistent_file(synth_pool, tmp_path, capsys):
    p = shutil.copytree(synth_pool, tmp_path / "p")
    run_stage(p, "inspect", progress=False)
    pool = Pool(p)
    sids = pool.done_shards("inspect")
    uids = pool.load("inspect")["uid"].tolist()
    select(pool, {"name": "some", "where": []})
    assert main(["verify", str(p)]) == 0
    assert ": ok" in capsys.readouterr().out
    t = pq.read_table(pool.column_path("inspect", sids[0]))
    pq.write_table(t.slice(0, 10), pool.column_path("inspect", sids[0]))  # rows lost, errors not written
    pool.embedding_path("inspect", sids[1], "image").parent.mkdir(parents=True)
    np.save(pool.embedding_path("inspect", sids[1], "image"), np.zeros((3, 2), np.float16))  # misaligned
    np.save(pool.subset_path("some"), read_subset(pool.subset_path("some"))[:5])  # .json says otherwise
    from unparrot.pool import write_subset

    write_subset(pool.subset_path("alien"), ["f" * 32] + uids[:2])
    (p / "columns" / "inspect" / ".x.parquet.abc.tmp").write_bytes(b"")
    assert main(["verify", str(p)]) == 1
    out = capsys.readouterr().out
    assert f"inspect/{sids[0]}.parquet: 10 rows + 0 error rows do not account for the shard's 100 samples" in out
    assert f"{sids[1]}.image.npy: 3 rows for the column file's 100" in out
    assert "some.json: says 300 kept, some.npy holds 5" in out
    assert "alien.npy: 1 of 3 uids are not in the pool" in out and "alien.json: missing" in out
    assert ".x.parquet.abc.tmp: left by an interrupted write" in out
    assert sorted(u8_to_uids(read_subset(pool.subset_path("alien")))) == sorted(["f" * 32] + uids[:2])


# ---- faults -------------------------------------------------------------------------------------
def test_a_shard_that_disappears_mid_run(synth_pool, tmp_path, capsys):
    """One line naming the missing shard; the shards done are kept and complete, none looks done that is
    not; once the shard is back the same command finishes the stage."""
    p = shutil.copytree(synth_pool, tmp_path / "p")
    victim = sorted((p / "shards").glob("*.tar"))[-1]
    argv = [
        "run",
        str(p),
        "helpers:HidesShard",
        "--param",
        f"victim={victim}",
        "--stage",
        "d",
        "--workers",
        "1",
        "--quiet",
    ]
    err = _one_line(capsys, argv, str(victim))
    assert "No such file" in err
    pool = Pool(p)
    assert pool.done_shards("d") == [s.id for s in pool.shards()][:2]
    assert not list(p.rglob(".*.tmp"))
    assert verify(p).ok  # what is there is consistent (the pool has two shards now)
    (victim.parent / (victim.name + ".aside")).rename(victim)
    assert main(argv) == 0
    assert "300 samples: 300 processed" in capsys.readouterr().out
    assert verify(p).ok, verify(p).line()
