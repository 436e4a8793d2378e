"""The Ray Data engine gives the local engine's files, errors and counts (a local Ray, started here)."""

import shutil

import pyarrow.parquet as pq
import pytest

from unparrot.engine import run
from unparrot.pool import Pool

pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_engine_matches_local(synth_pool, tmp_path):
    from helpers import bad_input_pool

    a = Pool(shutil.copytree(synth_pool, tmp_path / "a"))
    b = Pool(shutil.copytree(synth_pool, tmp_path / "b"))
    for pool, engine in ((a, "local"), (b, "ray")):
        run(pool, "spot", {"backend": "oracle"}, engine=engine, workers=2, progress=False)
        s = run(pool, "parrot", engine=engine, workers=2, progress=False)  # reads the spot stage's columns
        assert s.n_ok == 300 and s.n_err == 0
    for stage in ("spot", "parrot"):
        for sid in a.done_shards(stage):
            assert pq.read_table(a.column_path(stage, sid)).equals(pq.read_table(b.column_path(stage, sid)))
            # both record the shard they were made from (copies keep mtimes), so both redo a repaired shard
            meta = pq.read_schema(b.column_path(stage, sid)).metadata
            assert meta == pq.read_schema(a.column_path(stage, sid)).metadata and b"unparrot.source" in meta
    again = run(b, "parrot", engine="ray", workers=2, progress=False)
    assert again.skipped == 3  # finished shards are skipped
    bad_local = bad_input_pool(tmp_path / "bl")
    bad_ray = bad_input_pool(tmp_path / "br")
    sl = run(bad_local, "inspect", progress=False)
    sr = run(bad_ray, "inspect", engine="ray", workers=2, progress=False)
    assert (sl.n_in, sl.n_ok, sl.n_err) == (sr.n_in, sr.n_ok, sr.n_err)
    el, er = bad_local.errors("inspect"), bad_ray.errors("inspect")
    assert sorted(zip(el["key"].astype(str), el["reason"])) == sorted(zip(er["key"].astype(str), er["reason"]))


def _small_pool(root, shards=3, per_shard=4):
    from helpers import jpeg_bytes, write_tar

    for s in range(shards):
        members = []
        for i in range(per_shard):
            key = f"s{s}k{i}"
            members += [(f"{key}.jpg", jpeg_bytes(color=(40 * s, 20 * i, 90))), (f"{key}.txt", b"a square")]
        write_tar(root / "shards" / f"sh{s}.tar", members)
    return Pool(root)


@pytest.mark.slow
def test_ray_driver_killed_mid_stage_resumes_without_redoing_shards(tmp_path):
    """Shards are written as they finish (no shuffle): a driver killed in the last shard leaves the first
    ones done, and the rerun skips them (their files untouched) and ends with the local engine's files."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    killed, clean = _small_pool(tmp_path / "killed"), _small_pool(tmp_path / "clean")
    marker, gate = tmp_path / "in-last-shard", tmp_path / "gate"
    params = {"block_shard": "sh2", "marker": str(marker), "gate": str(gate)}
    tests, src = Path(__file__).parent, Path(__file__).parent.parent / "src"
    env = {**os.environ, "PYTHONPATH": f"{tests}{os.pathsep}{src}"}
    cmd = [
        sys.executable,
        "-m",
        "unparrot",
        "run",
        str(killed.root),
        "helpers:GatedDigest",
        "--stage",
        "d",
        "--engine",
        "ray",
        "--workers",
        "1",
        "--num-cpus",
        "1",
        "--batch-size",
        "2",
        "--quiet",
    ]
    cmd += [x for k, v in params.items() for x in ("--param", f"{k}={v}")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        for _ in range(6000):  # bounded poll for the driver to reach the last shard
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert marker.exists(), proc.communicate()[1].decode()[-2000:]
        assert killed.done_shards("d") == ["sh0", "sh1"]
        before = {sid: os.stat(killed.column_path("d", sid)).st_mtime_ns for sid in ("sh0", "sh1")}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    assert killed.done_shards("d") == ["sh0", "sh1"]
    gate.touch()
    s = run(killed, "helpers:GatedDigest", params, stage="d", engine="ray", workers=1, batch_size=2, progress=False)
    assert (s.skipped, s.n_in, s.n_ok, s.n_err) == (2, 12, 12, 0)
    assert {sid: os.stat(killed.column_path("d", sid)).st_mtime_ns for sid in ("sh0", "sh1")} == before
    c = run(clean, "helpers:GatedDigest", params, stage="d", workers=1, batch_size=2, progress=False)
    assert c.n_ok == 12
    for sid in ("sh0", "sh1", "sh2"):
        assert pq.read_table(killed.column_path("d", sid)).equals(pq.read_table(clean.column_path("d", sid)))


def test_engine_flags_on_every_per_sample_stage_and_defaults_in_one_place():
    """Every per-sample stage takes the Ray flags (generated from EngineConfig); both engines' runners
    default `workers` to EngineConfig's, and unset flags leave EngineConfig's defaults."""
    import dataclasses
    import inspect

    from unparrot.cli import build_parser, engine_options
    from unparrot.engine import EngineConfig, run_stage
    from unparrot.engine.ray import run_stage_ray

    p = build_parser()
    ray_flags = ["--engine", "ray", "--address", "auto", "--num-gpus", "0.5", "--num-cpus", "3", "--threads", "2"]
    for cmd in (
        ["run", "P", "inspect"],
        ["spot", "P"],
        ["parrot", "P"],
        ["profile", "P"],
        ["embed", "P"],
        ["aesthetic", "P", "--weights", "W"],
    ):
        got = engine_options(p.parse_args(cmd + ray_flags + ["--workers", "4"]))
        assert got == {
            "engine": "ray",
            "workers": 4,
            "threads": 2,
            "address": "auto",
            "num_cpus": 3.0,
            "num_gpus": 0.5,
        }, cmd
        unset = engine_options(p.parse_args(cmd))
        assert {k: v for k, v in unset.items() if k != "workers"} == {
            k: v for k, v in dataclasses.asdict(EngineConfig()).items() if k != "workers"
        }
    a = p.parse_args(["deparrot", "P", "--engine", "ray", "--address", "auto", "--num-gpus", "1"])
    assert (a.engine, a.address, a.num_gpus, a.num_cpus) == ("ray", "auto", 1.0, None)
    default = EngineConfig().workers
    for fn in (run_stage, run_stage_ray):
        assert inspect.signature(fn).parameters["workers"].default == default
        assert inspect.signature(fn).parameters["threads"].default is None


def test_ray_options_on_the_local_engine_are_a_clear_error(tmp_path, capsys):
    from unparrot.cli import main

    pool = _small_pool(tmp_path / "p", shards=1, per_shard=1)
    assert main(["run", str(pool.root), "inspect", "--address", "auto", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "options of the ray engine" in err
    with pytest.raises(ValueError, match="unknown engine"):
        run(pool, "inspect", engine="spark", progress=False)
    assert not pool.done_shards("inspect")


@pytest.mark.slow
def test_ray_worker_killed_mid_shard_is_restarted_and_the_shard_retried(tmp_path):
    """An actor process that dies in a shard (killed, out of memory) is restarted and that shard redone
    in the same run; the files equal the local engine's."""
    a, b = _small_pool(tmp_path / "a", shards=2), _small_pool(tmp_path / "b", shards=2)
    marker = tmp_path / "died"
    params = {"die_shard": "sh1", "marker": str(marker)}
    s = run(a, "helpers:DiesOnce", params, stage="d", engine="ray", workers=1, num_cpus=1, batch_size=2, progress=False)
    assert marker.exists()  # the actor did die
    assert (s.skipped, s.n_in, s.n_ok, s.n_err) == (0, 8, 8, 0)
    run(b, "helpers:DiesOnce", params, stage="d", batch_size=2, progress=False)
    for sid in ("sh0", "sh1"):
        assert pq.read_table(a.column_path("d", sid)).equals(pq.read_table(b.column_path("d", sid)))
    assert not list((a.root / "columns" / "d").glob(".*tmp*"))


@pytest.mark.slow
def test_ray_asking_for_gpus_the_cluster_lacks_is_a_clear_error(tmp_path):
    """An actor that can never be placed would wait forever; the engine says so instead (CPU machines)."""
    import ray

    pool = _small_pool(tmp_path / "p", shards=1, per_shard=1)
    with pytest.raises(RuntimeError, match="GPU"):
        run(pool, "inspect", engine="ray", workers=1, num_cpus=1, num_gpus=64, progress=False)
    assert not ray.is_initialized() and not pool.done_shards("inspect")
