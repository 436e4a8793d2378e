import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from unparrot.engine import StageConflict, run_stage
from unparrot.pool import Pool
from helpers import bad_input_pool

HERE = Path(__file__).parent
ROOT = HERE.parent


def _complete_keys(path) -> set:
    """Keys whose members lie wholly inside a (truncated) tar, read with the standard library."""
    import tarfile

    size, keys = os.path.getsize(path), set()
    with open(path, "rb") as f:
        try:
            for m in tarfile.open(fileobj=f, mode="r|"):
                if m.offset_data + m.size <= size:
                    keys.add(m.name.split(".")[0])
        except tarfile.TarError:
            pass
    return keys


def test_bad_input_gives_error_rows_and_counts_add_up(tmp_path):
    pool = bad_input_pool(tmp_path)
    s = run_stage(pool, "inspect", progress=False)
    assert s.n_in == s.n_ok + s.n_err
    errs = pool.errors("inspect")
    by_key = {k: r for k, r in zip(errs["key"], errs["reason"])}
    assert "empty" in by_key["zero"]
    assert "cannot decode" in by_key["nonimg"]
    assert "cannot decode" in by_key["trunc"]
    assert "too large" in by_key["huge"]
    assert "traversal" in by_key["../evil"]
    assert "UTF-8" in by_key["badutf"]
    assert "missing caption" in by_key["nocap"]
    assert "duplicate uid" in by_key["dup2"]
    assert "first in shard 00-good" in by_key["x"]  # a uid seen in an earlier shard
    assert any("truncated" in r or "corrupt" in r for r in errs["reason"])
    ok = set(pool.load("inspect")["key"])
    assert {"g0", "g1", "ok", "dup1", "y", "t0"} <= ok
    # every sample that went in is either processed or an error row, never both, never lost
    sample_errs = errs[errs["uid"].notna()]
    assert len(ok) + len(sample_errs) == s.n_in
    assert not ok & set(sample_errs["key"])
    # counted independently of the engine: every sample whose bytes are in the shards is accounted for
    written = {
        "g0",
        "g1",
        "zero",
        "nonimg",
        "trunc",
        "huge",
        "../evil",
        "badutf",
        "nocap",
        "dup1",
        "dup2",
        "ok",
        "x",
        "y",
    } | _complete_keys(pool.root / "shards" / "02-truncated.tar")
    assert set(errs["key"].dropna()) | ok >= written
    assert s.n_in >= len(written) and len(written) >= 15  # at least one sample survives the truncation
    assert "truncated" in " ".join(s.problems) or "corrupt" in " ".join(s.problems)


def test_stage_conflict_and_overwrite(synth_pool, tmp_path):
    pool_dir = tmp_path / "p"
    shutil.copytree(synth_pool, pool_dir)
    run_stage(pool_dir, "inspect", progress=False)
    with pytest.raises(StageConflict, match="overwrite"):
        run_stage(pool_dir, "inspect", {"max_pixels": 1000}, progress=False)
    s = run_stage(pool_dir, "inspect", {"max_pixels": 1000}, overwrite=True, progress=False)
    assert s.n_ok == 0 and s.n_err == 300  # 64x64 > 1000 pixels: all rejected, all counted
    with pytest.raises(TypeError, match="bad parameters"):
        run_stage(pool_dir, "inspect", {"nope": 1}, progress=False)


def test_parallel_equals_serial(synth_pool, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(synth_pool, a)
    shutil.copytree(synth_pool, b)
    sa = run_stage(a, "helpers:SlowDigest", {"delay": 0.0}, stage="d", workers=1, progress=False)
    sb = run_stage(b, "helpers:SlowDigest", {"delay": 0.0}, stage="d", workers=2, batch_size=7, progress=False)
    assert sa.n_ok == sb.n_ok == 300
    for sid in Pool(a).done_shards("d"):
        assert pq.read_table(Pool(a).column_path("d", sid)).equals(pq.read_table(Pool(b).column_path("d", sid)))


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d))
    return out


@pytest.mark.slow
def test_resume_after_killed_worker(tmp_path):
    from unparrot.synth.generate import synth

    src = tmp_path / "src"
    synth(src, n=400, preset="learnable", seed=5, shard_size=50, eval_sets=(), workers=2, progress=False)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    shutil.copytree(src, killed)
    shutil.copytree(src, clean)
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{ROOT / 'src'}"}
    hold = tmp_path / "hold"
    hold.touch()
    free = ["00000", "00001"]
    params = {"hold": str(hold), "free": free}
    assert [s.id for s in Pool(killed).shards()][:2] == free
    cmd = [
        sys.executable,
        "-m",
        "unparrot",
        "run",
        str(killed),
        "helpers:HeldDigest",
        "--param",
        f"hold={hold}",
        "--param",
        f"free={json.dumps(free)}",
        "--stage",
        "d",
        "--workers",
        "2",
        "--batch-size",
        "10",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pool = Pool(killed)
    # both workers announce that they wait in a held shard: the two free shards are done, no other is.
    # (the limit is a safety net against a hang, not a measure of speed)
    limit = time.monotonic() + 600
    while len(list(tmp_path.glob("hold.*.waiting"))) < 2 and proc.poll() is None and time.monotonic() < limit:
        time.sleep(0.05)
    assert len(list(tmp_path.glob("hold.*.waiting"))) == 2, proc.communicate(timeout=60)
    assert pool.done_shards("d") == free
    workers = [c for c in _children(proc.pid) if "resource_tracker" not in open(f"/proc/{c}/cmdline").read()]
    assert workers
    os.kill(workers[-1], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "rerun the same command to resume" in err
    done_before = len(pool.done_shards("d"))
    assert done_before == 2
    # no half-written files are visible as done
    for sid in pool.done_shards("d"):
        pq.read_table(pool.column_path("d", sid))
    hold.unlink()
    s = run_stage(killed, "helpers:HeldDigest", params, stage="d", workers=2, batch_size=10, progress=False)
    assert s.skipped == done_before and s.n_ok == 400
    c = run_stage(clean, "helpers:HeldDigest", params, stage="d", workers=2, batch_size=10, progress=False)
    assert c.n_ok == 400
    assert sorted(Pool(clean).done_shards("d")) == sorted(pool.done_shards("d"))
    for sid in Pool(clean).done_shards("d"):
        assert pq.read_table(pool.column_path("d", sid)).equals(pq.read_table(Pool(clean).column_path("d", sid)))
    assert not list((killed / "columns" / "d").glob(".*tmp"))


def test_missing_input_stage_is_clear(synth_pool, tmp_path):
    from unparrot.ops.base import Operator

    class NeedsSpot(Operator):
        inputs = {"spot": ["texts"]}

    import unparrot.ops as ops

    ops.OPS["_needs_spot"] = f"{__name__}:NeedsSpotGlobal"
    globals()["NeedsSpotGlobal"] = NeedsSpot
    try:
        with pytest.raises(FileNotFoundError, match="needs stage 'spot' first"):
            run_stage(synth_pool, "_needs_spot", progress=False)
    finally:
        del ops.OPS["_needs_spot"]


def test_cross_shard_duplicate_pass_finishes_after_a_kill(tmp_path):
    """Killed inside the duplicate pass (before or after its error rows were written, before the table was
    rewritten): the next run, with no shard left to process, finishes the pass, with each error row once."""
    from unparrot.engine.local import process_shard
    from unparrot.ops import get_op

    pool = bad_input_pool(tmp_path)
    clean = run_stage(pool, "inspect", progress=False)
    want_err = pool.errors("inspect").sort_values(["key", "reason"]).reset_index(drop=True)
    want_ok = sorted(pool.load("inspect")["uid"])
    stamp = pool.root / "columns" / "inspect" / "_cross_shard_dups.done"
    assert stamp.exists()  # a rerun with nothing new skips the check
    shard = next(s for s in pool.shards() if s.id == "03-crossdup")
    err_path = pool.error_path("inspect", "03-crossdup")
    for errors_written in (False, True):
        saved = err_path.read_bytes()
        process_shard(pool, shard, get_op("inspect")(), "inspect")  # the shard as written before the pass
        assert len(pool.read_columns("inspect", "03-crossdup")) == 2  # the duplicate is back in the table
        assert not stamp.exists()  # new output makes the check due again
        if errors_written:
            err_path.write_bytes(saved)
        again = run_stage(pool, "inspect", progress=False)
        assert again.skipped == again.shards
        assert (again.n_in, again.n_ok, again.n_err) == (clean.n_in, clean.n_ok, clean.n_err)
        assert pool.errors("inspect").sort_values(["key", "reason"]).reset_index(drop=True).equals(want_err)
        assert sorted(pool.load("inspect")["uid"]) == want_ok
