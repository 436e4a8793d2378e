import io
import tarfile

from helpers import jpeg_bytes, write_tar
from unparrot.io.tar import RawSample, ShardProblem, ShardWriter, count_samples, iter_samples, split_key, unsafe_name


def test_split_key_follows_webdataset():
    assert split_key("000001.jpg") == ("000001", "jpg")
    assert split_key("dir/a.b.JPG") == ("dir/a", "b.jpg")  # first dot of the basename
    assert split_key("x.y/abc.txt") == ("x.y/abc", "txt")  # dots in folders are part of the key
    assert split_key("noext") is None


def test_unsafe_names():
    assert unsafe_name("../etc/passwd.txt")
    assert unsafe_name("/abs/x.jpg")
    assert unsafe_name("a/../../b.jpg")
    assert unsafe_name("ok/0001.jpg") is None


def test_groups_consecutive_members(tmp_path):
    p = write_tar(tmp_path / "a.tar", [("k1.jpg", b"i1"), ("k1.txt", b"c1"), ("k2.jpg", b"i2"), ("k2.json", b"{}")])
    out = list(iter_samples(p))
    assert [s.key for s in out] == ["k1", "k2"]
    assert out[0].members == {"jpg": b"i1", "txt": b"c1"}
    assert count_samples(p) == 2


def test_truncated_tar_inside_member_marks_sample(tmp_path):
    big = jpeg_bytes(size=(300, 300)) + b"\0" * 20000
    p = write_tar(tmp_path / "t.tar", [("a.jpg", big), ("a.txt", b"x"), ("b.jpg", big), ("b.txt", b"y")])
    data = open(p, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) * 3 // 4])
    out = list(iter_samples(cut))
    assert out[0].key == "a" and out[0].problem is None
    assert isinstance(out[-1], RawSample) and out[-1].key == "b"
    assert "truncated" in out[-1].problem or "corrupt" in out[-1].problem


def test_truncated_between_samples_is_shard_problem(tmp_path):
    p = write_tar(tmp_path / "t.tar", [("a.jpg", b"1" * 512), ("b.jpg", b"2" * 512)])
    data = open(p, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 1024 + 100])  # a's header+data, then a partial header of b
    out = list(iter_samples(cut))
    assert out[0].key == "a"
    assert any(isinstance(o, ShardProblem) or (isinstance(o, RawSample) and o.problem) for o in out[1:])


def test_garbage_is_not_a_crash(tmp_path):
    p = tmp_path / "g.tar"
    p.write_bytes(b"this is not a tar file at all" * 100)
    out = list(iter_samples(p))
    assert len(out) == 1 and isinstance(out[0], ShardProblem)


def test_path_traversal_marks_sample(tmp_path):
    p = write_tar(tmp_path / "e.tar", [("../evil.jpg", b"x"), ("../evil.txt", b"y"), ("ok.jpg", b"z")])
    out = list(iter_samples(p))
    assert out[0].problem and "traversal" in out[0].problem
    assert out[1].key == "ok" and out[1].problem is None


def test_member_size_limit(tmp_path):
    p = write_tar(tmp_path / "s.tar", [("a.jpg", b"x" * 5000), ("a.txt", b"c")])
    out = list(iter_samples(p, max_member_bytes=1000))
    assert "limit" in out[0].problem


def test_shard_writer_roundtrip(tmp_path):
    with ShardWriter(str(tmp_path / "o" / "{:03d}.tar"), max_count=2) as w:
        for i in range(5):
            w.write(f"{i:04d}", {"jpg": b"img", "txt": f"cap {i}"})
    assert [p.split("/")[-1] for p in w.written] == ["000.tar", "001.tar", "002.tar"]
    keys = [s.key for p in w.written for s in iter_samples(p)]
    assert keys == ["0000", "0001", "0002", "0003", "0004"]
    with tarfile.open(w.written[0]) as tf:
        assert tf.getnames() == ["0000.jpg", "0000.txt", "0001.jpg", "0001.txt"]


def test_shard_writer_rejects_unsafe_keys(tmp_path):
    import pytest

    with ShardWriter(str(tmp_path / "{:03d}.tar")) as w:
        with pytest.raises(ValueError):
            w.write("../x", {"txt": "a"})
        with pytest.raises(ValueError):
            w.write("a.b", {"txt": "a"})


def test_long_names_pax_gnu_and_compressed(tmp_path):
    import gzip

    long_key = "d" * 60 + "/" + "k" * 80  # > 100 characters: needs ustar prefix, GNU or pax headers
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        p = tmp_path / f"{fmt}.tar"
        with tarfile.open(p, "w", format=fmt) as tf:
            for name, data in [(long_key + ".jpg", b"img"), (long_key + ".txt", "ç".encode()), ("ünï.txt", b"u")]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        out = list(iter_samples(p))
        assert [s.key for s in out] == [long_key, "ünï"], fmt
        assert out[0].members == {"jpg": b"img", "txt": "ç".encode()}
        assert all(isinstance(s, RawSample) and s.problem is None for s in out)
    gz = tmp_path / "c.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / f"{tarfile.PAX_FORMAT}.tar").read_bytes()))
    assert [s.key for s in iter_samples(gz)] == [long_key, "ünï"]
    assert count_samples(gz) == 2


def test_bad_checksum_is_reported(tmp_path):
    p = write_tar(tmp_path / "a.tar", [("a.txt", b"x"), ("b.txt", b"y")])
    data = bytearray(open(p, "rb").read())
    data[1024 + 10] ^= 0xFF  # corrupt b's header name
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    out = list(iter_samples(tmp_path / "bad.tar"))
    assert out[0].key == "a" and out[0].problem is None
    assert isinstance(out[1], ShardProblem) and "checksum" in out[1].reason
