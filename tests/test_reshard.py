import json

import numpy as np
import pytest

from helpers import jpeg_bytes
from unparrot.engine import run_stage
from unparrot.ingest import ingest
from unparrot.curate.reshard import reshard
from unparrot.pool import Pool, write_subset


def test_ingest_reshard_read_roundtrip(tmp_path):
    (tmp_path / "im").mkdir()
    lines = ["filepath,title"]
    for i in range(25):
        (tmp_path / "im" / f"{i}.jpg").write_bytes(jpeg_bytes((i * 9 % 256, 0, 0)))
        lines.append(f"im/{i}.jpg,caption number {i}")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    ingest(str(tmp_path / "t.csv"), tmp_path / "pool", shard_size=10, progress=False)
    pool = Pool(tmp_path / "pool")
    run_stage(pool, "inspect", progress=False)
    rows = list(pool.samples())
    chosen = [r for r in rows if int(r["caption"].split()[-1]) % 3 == 0]
    write_subset(pool.subset_path("thirds"), [r["uid"] for r in chosen] + ["f" * 32])  # one uid not in the pool
    s = reshard(
        pool,
        pool.subset_path("thirds"),
        tmp_path / "out",
        shard_size=4,
        columns=["inspect.width", "caption_words"],
        progress=False,
    )
    assert s.written == len(chosen) == 9 and s.missing == 1 and s.shards == 3
    out = list(Pool(tmp_path / "out").samples())
    assert [r["caption"] for r in out] == [r["caption"] for r in chosen]
    assert [r["image"] for r in out] == [r["image"] for r in chosen]  # bytes copied unchanged
    assert [r["uid"] for r in out] == [r["uid"] for r in chosen]
    assert all(r["meta"]["width"] == 32 and r["meta"]["caption_words"] == 3 for r in out)
    assert all(r["meta"]["uid"] == r["uid"] for r in out)
    with pytest.raises(FileExistsError):
        reshard(pool, pool.subset_path("thirds"), tmp_path / "out", progress=False)
    with pytest.raises(KeyError, match="no stage"):
        reshard(pool, pool.subset_path("thirds"), tmp_path / "out2", columns=["nope"], progress=False)


def test_reshard_keeps_extra_members_and_webdataset_reads_it(synth_pool, tmp_path):
    import webdataset as wds

    pool = Pool(synth_pool)
    uids = [r["uid"] for r in pool.samples()][::7]
    out = tmp_path / "sub"
    reshard(
        pool,
        np.sort(np.unique(np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uids], "u8,u8"))),
        out,
        shard_size=20,
        progress=False,
    )
    ds = wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False).decode("pil")
    got = [
        (s["__key__"], s["txt"], json.loads(s["json"]) if isinstance(s["json"], (bytes, str)) else s["json"])
        for s in ds
    ]
    assert len(got) == len(uids)
    assert [g[2]["uid"] for g in got] == uids
    assert all("synth" in g[2] for g in got)
