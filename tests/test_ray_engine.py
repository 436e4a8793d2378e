"""The Ray Data engine gives the local engine's files, errors and counts (a local Ray, started here)."""

import shutil

import pyarrow.parquet as pq
import pytest

from unparrot.engine import run
from unparrot.pool import Pool

pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_engine_matches_local(synth_pool, tmp_path):
    from test_engine import _bad_input_pool

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
    bad_local = _bad_input_pool(tmp_path / "bl")
    bad_ray = _bad_input_pool(tmp_path / "br")
    sl = run(bad_local, "inspect", progress=False)
    sr = run(bad_ray, "inspect", engine="ray", workers=2, progress=False)
    assert (sl.n_in, sl.n_ok, sl.n_err) == (sr.n_in, sr.n_ok, sr.n_err)
    el, er = bad_local.errors("inspect"), bad_ray.errors("inspect")
    assert sorted(zip(el["key"].astype(str), el["reason"])) == sorted(zip(er["key"].astype(str), er["reason"]))
