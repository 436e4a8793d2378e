import json

import numpy as np
import pytest

from helpers import jpeg_bytes, write_tar
from unparrot.pool import (
    FirstSeen,
    Pool,
    expand_braces,
    read_subset,
    subset_contains,
    u8_to_uids,
    uids_to_u8,
    write_subset,
)


def _uid(i):
    return f"{i * 2654435761 % (1 << 64):016x}{(i * 40503) % (1 << 64):016x}"


def test_expand_braces():
    assert expand_braces("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_subset_is_datacomp_format(tmp_path):
    uids = [_uid(i) for i in range(50)] + [_uid(3)]  # a duplicate
    arr = write_subset(tmp_path / "s.npy", uids)
    back = np.load(tmp_path / "s.npy")
    assert back.dtype == np.dtype("u8,u8")
    assert len(back) == 50
    # sorted lexicographically by (high, low): what DataComp's resharder binary-searches
    pairs = [(int(a), int(b)) for a, b in zip(back["f0"], back["f1"])]
    assert pairs == sorted(pairs)
    assert sorted(u8_to_uids(read_subset(tmp_path / "s.npy"))) == sorted(set(uids))
    # the high half is the first 16 hex digits
    assert int(back[0]["f0"]) == min(int(u[:16], 16) for u in uids)
    assert np.array_equal(arr, back)


def test_subset_contains():
    sub = uids_to_u8([_uid(i) for i in range(0, 20, 2)])
    q = [_uid(i) for i in range(20)]
    assert subset_contains(sub, q).tolist() == [i % 2 == 0 for i in range(20)]
    assert subset_contains(uids_to_u8([]), q).sum() == 0


def test_bad_uid_is_clear():
    with pytest.raises(ValueError, match="32 hex"):
        uids_to_u8(["abc"])


def test_read_subset_rejects_wrong_dtype(tmp_path):
    np.save(tmp_path / "bad.npy", np.arange(5))
    with pytest.raises(ValueError, match="u8, u8"):
        read_subset(tmp_path / "bad.npy")


def test_columns_join_and_embeddings(tmp_path):
    (tmp_path / "shards").mkdir()
    pool = Pool(tmp_path)
    u = [_uid(i) for i in range(6)]
    pool.write_columns(
        "a", "00", {"uid": u[:3], "key": ["0", "1", "2"], "x": [1, 2, 3], "emb": np.eye(3, 4, dtype=np.float32)}
    )
    pool.write_columns(
        "a", "01", {"uid": u[3:], "key": ["3", "4", "5"], "x": [4, 5, 6], "emb": np.ones((3, 4), np.float32)}
    )
    pool.write_columns(
        "b",
        "00",
        {"uid": [u[2], u[0]], "key": ["2", "0"], "y": ["c", "a"]},
        errors=[{"uid": u[1], "key": "1", "reason": "broken"}],
    )
    pool.write_columns("b", "01", {"uid": u[3:], "key": ["3", "4", "5"], "y": ["d", "e", "f"]})
    df = pool.load(["a", "b"], columns=["x", "y"])
    assert df["uid"].tolist() == u
    assert [None if v != v else v for v in df["y"]] == ["a", None, "c", "d", "e", "f"]
    assert df["shard"].tolist() == ["00"] * 3 + ["01"] * 3
    inner = pool.load(["a", "b"], how="inner")
    assert len(inner) == 5
    uids, arrs = pool.embeddings("a", "emb")
    assert uids == u and isinstance(arrs[0], np.memmap) and arrs[0].dtype == np.float16
    assert np.allclose(np.concatenate(arrs)[:3], np.eye(3, 4))
    assert pool.errors("b")["reason"].tolist() == ["broken"]
    with pytest.raises(KeyError):
        pool.load("a", columns=["nope"])
    with pytest.raises(FileNotFoundError):
        pool.load("c")


def test_shards_in_place_via_pool_yaml(tmp_path):
    from helpers import write_tar

    ext = tmp_path / "elsewhere"
    for i in range(3):
        write_tar(ext / f"{i:05d}.tar", [("a.txt", b"x")])
    root = tmp_path / "pool"
    root.mkdir()
    (root / "pool.yaml").write_text(f"shards: '{ext}/{{00000..00002}}.tar'\n")
    assert [s.id for s in Pool(root).shards()] == ["00000", "00001", "00002"]
    (root / "pool.yaml").write_text(f"shards: '{ext}/{{00000..00009}}.tar'\n")
    with pytest.raises(FileNotFoundError, match="not found"):
        Pool(root).shards()


def test_rows_reasons_inputs_and_the_duplicate_rule(tmp_path):
    """`Pool.rows`: a sample's own problem, a missing input, the stage's `check`, then a uid kept before
    (per shard, or across shards with a shared `FirstSeen`); `samples` skips nothing but tar breaks."""

    def sample(key, uid, caption=b"a red ball"):
        m = [(f"{key}.jpg", jpeg_bytes()), (f"{key}.json", json.dumps({"uid": _uid(uid)}).encode())]
        return m + ([(f"{key}.txt", caption)] if caption is not None else [])

    write_tar(
        tmp_path / "shards" / "00.tar",
        sample("a", 1) + sample("b", 1) + sample("c", 2, None) + sample("d", 3) + sample("e", 4, b"refuse me"),
    )
    write_tar(tmp_path / "shards" / "01.tar", sample("f", 1) + sample("g", 5))
    pool = Pool(tmp_path)
    assert [r["key"] for r in pool.samples()] == list("abcdefg")
    s00, s01 = pool.shards()
    pool.write_columns("in", "00", {"uid": [_uid(i) for i in (1, 2, 4)], "key": list("ace"), "x": [10, 20, 40]})
    seen = FirstSeen()
    got = {}
    for sh in (s00, s01):
        for row, reason, _ in pool.rows(
            sh,
            {"in": ["x"]},
            ("caption",),
            seen=seen,
            check=lambda r: "refused" if r["caption"] == "refuse me" else None,
        ):
            got[row["key"]] = reason if reason else row["x"]
    assert got == {
        "a": 10,
        "b": f"duplicate uid {_uid(1)} (first at key a of this shard)",
        "c": got["c"],
        "d": "no 'in' output for this sample (see errors/in)",
        "e": "refused",
        "f": "no 'in' output for this sample (see errors/in)",
        "g": got["g"],
    }
    assert "caption" in got["c"] and got["g"].startswith("no 'in' output")  # 01 has no 'in' file: no rows
    assert seen.duplicate(_uid(1), "01") == f"duplicate uid {_uid(1)} (first in shard 00)"
    assert seen.duplicate(_uid(9), "01") is None
