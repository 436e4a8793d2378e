import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import jpeg_bytes, write_tar
from unparrot.engine import run_stage
from unparrot.ingest import detect_format, ingest
from unparrot.io.readers import imagenet_caption
from unparrot.io.samples import content_uid
from unparrot.pool import Pool


def _captions(pool):
    return sorted(r["caption"] for r in Pool(pool).samples())


def test_img2dataset_shards_used_in_place(tmp_path):
    """img2dataset writes {key}.jpg/.txt/.json (url, key, status, ...; no uid) and parquet per shard."""
    src = tmp_path / "laion"
    for s in range(2):
        members = []
        for i in range(3):
            key = f"{s:05d}{i:04d}"
            meta = {
                "url": f"http://example.com/{key}.jpg",
                "key": key,
                "status": "success",
                "caption": f"cap {s} {i}",
                "width": 32,
                "height": 24,
                "error_message": None,
            }
            members += [
                (f"{key}.jpg", jpeg_bytes()),
                (f"{key}.txt", f"cap {s} {i}".encode()),
                (f"{key}.json", json.dumps(meta).encode()),
            ]
        write_tar(src / f"{s:05d}.tar", members)
        pq.write_table(pa.table({"key": ["x"]}), src / f"{s:05d}.parquet")
    summary = ingest(str(src), tmp_path / "pool")
    assert summary.in_place and summary.shards == 2
    assert not (tmp_path / "pool" / "shards").exists()  # never copied
    rows = list(Pool(tmp_path / "pool").samples())
    assert len(rows) == 6
    assert rows[0]["uid"] == content_uid(rows[0]["image"], rows[0]["caption"])
    assert len({r["uid"] for r in rows}) == 6
    s = run_stage(tmp_path / "pool", "inspect", progress=False)
    assert s.n_ok == 6


def test_datacomp_brace_pattern_and_existing_uids(tmp_path):
    src = tmp_path / "dc"
    for s in range(3):
        write_tar(
            src / f"{s:08d}.tar",
            [
                (f"{s}a.jpg", jpeg_bytes()),
                (f"{s}a.txt", b"t"),
                (f"{s}a.json", json.dumps({"uid": f"{s:032x}"}).encode()),
            ],
        )
    ingest(str(src / "{00000000..00000002}.tar"), tmp_path / "pool")
    rows = list(Pool(tmp_path / "pool").samples())
    assert [r["uid"] for r in rows] == [f"{s:032x}" for s in range(3)]


def test_non_hex_uid_hashed_and_kept(tmp_path):
    write_tar(
        tmp_path / "s" / "a.tar",
        [("k.jpg", jpeg_bytes()), ("k.txt", b"c"), ("k.json", json.dumps({"uid": 12345}).encode())],
    )
    ingest(str(tmp_path / "s"), tmp_path / "pool")
    (row,) = list(Pool(tmp_path / "pool").samples())
    assert len(row["uid"]) == 32 and row["source_uid"] == "12345"


def test_parquet_bytes_struct_and_paths(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "a.png").write_bytes(jpeg_bytes(fmt="PNG"))
    pq.write_table(
        pa.table({"image": [jpeg_bytes(), jpeg_bytes((1, 2, 3))], "caption": ["one", "two"], "extra": [1, 2]}),
        tmp_path / "bytes.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "image": [{"bytes": jpeg_bytes(), "path": "x.jpg"}, {"bytes": None, "path": "imgs/a.png"}],
                "text": ["hf1", "hf2"],
            }
        ),
        tmp_path / "hf.parquet",
    )
    pq.write_table(
        pa.table({"filepath": ["imgs/a.png", "imgs/missing.png"], "title": ["p1", "p2"]}), tmp_path / "paths.parquet"
    )
    s = ingest(str(tmp_path / "bytes.parquet"), tmp_path / "p1", progress=False)
    assert (s.n_in, s.n_written, s.n_err) == (2, 2, 0)
    assert _captions(tmp_path / "p1") == ["one", "two"]
    rows = list(Pool(tmp_path / "p1").samples())
    assert rows[0]["meta"]["extra"] == 1
    ingest(str(tmp_path / "hf.parquet"), tmp_path / "p2", progress=False)
    rows = list(Pool(tmp_path / "p2").samples())
    assert [r["image_ext"] for r in rows] == ["jpg", "png"]
    s = ingest(str(tmp_path / "paths.parquet"), tmp_path / "p3", progress=False)
    assert (s.n_written, s.n_err) == (1, 1)
    err = Pool(tmp_path / "p3").errors("ingest")
    assert "missing.png" in err["reason"][0]
    assert s.n_in == s.n_written + s.n_err


def test_csv_tsv_jsonl_tables(tmp_path):
    (tmp_path / "im").mkdir()
    for n in "ab":
        (tmp_path / "im" / f"{n}.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "t.csv").write_text('filepath,title\nim/a.jpg,"a, with comma"\nim/b.jpg,second\n')
    (tmp_path / "t.tsv").write_text("filepath\ttitle\nim/a.jpg\tfirst tab\n")
    (tmp_path / "t.jsonl").write_text(json.dumps({"path": "im/b.jpg", "caption": "from jsonl"}) + "\n{broken\n")
    ingest(str(tmp_path / "t.csv"), tmp_path / "p1", progress=False)
    assert _captions(tmp_path / "p1") == ["a, with comma", "second"]
    ingest(str(tmp_path / "t.tsv"), tmp_path / "p2", progress=False)
    assert _captions(tmp_path / "p2") == ["first tab"]
    s = ingest(str(tmp_path / "t.jsonl"), tmp_path / "p3", progress=False)
    assert (s.n_written, s.n_err) == (1, 1)
    with pytest.raises(KeyError, match="caption"):
        ingest(str(tmp_path / "t.csv"), tmp_path / "p4", caption_col="nope", progress=False)


def test_a_bad_table_line_costs_only_that_line(tmp_path):
    import csv

    (tmp_path / "im").mkdir()
    for n in "abcd":
        (tmp_path / "im" / f"{n}.jpg").write_bytes(jpeg_bytes())
    huge = "x" * (csv.field_size_limit() + 10)
    (tmp_path / "t.csv").write_bytes(
        b"filepath,title\nim/a.jpg,first\nim/b.jpg,bad \xff\xfe bytes\nim/c.jpg,third\n"
        + f"im/d.jpg,{huge}\n".encode()
        + b"im/a.jpg,fifth\n"
    )
    s = ingest(str(tmp_path / "t.csv"), tmp_path / "p", progress=False)
    assert sorted(_captions(tmp_path / "p")) == ["fifth", "first", "third"]
    assert (s.n_in, s.n_written, s.n_err) == (5, 3, 2)
    reasons = " ".join(Pool(tmp_path / "p").errors("ingest")["reason"])
    assert "not valid UTF-8" in reasons and "field larger than field limit" in reasons


def test_imagenet_captions(tmp_path):
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    (tmp_path / "train" / "n01440764" / "n01440764_1.JPEG").write_bytes(jpeg_bytes())
    recs = [
        {
            "filename": "n01440764_1.JPEG",
            "wnid": "n01440764",
            "title": "Big tench",
            "description": "caught today",
            "tags": ["fish", "lake"],
        },
        {"filename": "n0_missing.JPEG", "wnid": "n0", "title": "t", "description": "", "tags": []},
    ]
    (tmp_path / "imagenet_captions.json").write_text(json.dumps(recs))
    assert imagenet_caption(recs[0]) == "Big tench fish lake caught today"
    assert imagenet_caption(recs[0], ("description", "title"), " | ") == "caught today | Big tench"
    s = ingest(
        str(tmp_path / "imagenet_captions.json"), tmp_path / "pool", image_root=str(tmp_path / "train"), progress=False
    )
    assert detect_format(str(tmp_path / "imagenet_captions.json")) == "imagenet-captions"
    assert (s.n_written, s.n_err) == (1, 1)
    (row,) = list(Pool(tmp_path / "pool").samples())
    assert row["caption"] == "Big tench fish lake caught today" and row["meta"]["wnid"] == "n01440764"


def test_image_folder(tmp_path):
    d = tmp_path / "f"
    d.mkdir()
    (d / "x.jpg").write_bytes(jpeg_bytes())
    (d / "x.txt").write_text("folder caption")
    (d / "y.png").write_bytes(jpeg_bytes(fmt="PNG"))
    s = ingest(str(d), tmp_path / "pool", progress=False)
    assert (s.n_written, s.n_err) == (1, 1)
    assert _captions(tmp_path / "pool") == ["folder caption"]


def test_ingest_resumes_without_rewriting(tmp_path):
    (tmp_path / "im").mkdir()
    lines = ["filepath,title"]
    for i in range(7):
        (tmp_path / "im" / f"{i}.jpg").write_bytes(jpeg_bytes((i, i, i)))
        lines.append(f"im/{i}.jpg,cap {i}")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    ingest(str(tmp_path / "t.csv"), tmp_path / "pool", shard_size=3, progress=False)
    shards = sorted((tmp_path / "pool" / "shards").glob("*.tar"))
    assert len(shards) == 3
    first = shards[0].read_bytes()
    shards[2].unlink()  # as if killed before the last shard was renamed into place
    mtime = shards[0].stat().st_mtime_ns
    ingest(str(tmp_path / "t.csv"), tmp_path / "pool", shard_size=3, progress=False)
    assert shards[0].stat().st_mtime_ns == mtime and shards[0].read_bytes() == first
    assert _captions(tmp_path / "pool") == [f"cap {i}" for i in range(7)]
