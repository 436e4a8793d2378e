"""Property-based fuzzing of everything that reads untrusted input (issue 12 §3).

Bounded for CI: derandomized (the same examples on every machine) and FUZZ_EXAMPLES examples per target
(default 150; UNPARROT_FUZZ_EXAMPLES=5000 UNPARROT_FUZZ_RANDOM=1 for a long run, see docs/reliability.md).
Each property is a guarantee stated in docs/reliability.md; every failure found became a fix and stays here as an
example.
"""

import io
import json
import os
import signal
import tarfile
from contextlib import contextmanager

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import jpeg_bytes  # noqa: E402
from unparrot.curate.expr import ExprError, check, evaluate, parse  # noqa: E402
from unparrot.imaging.decode import DecodeError, open_image  # noqa: E402
from unparrot.io.readers import read_parquet, read_table  # noqa: E402
from unparrot.io.samples import parse_sample  # noqa: E402
from unparrot.io.tar import RawSample, ShardProblem, iter_samples, unsafe_name  # noqa: E402
from unparrot.pool import to_arrow  # noqa: E402
from unparrot.rewrite.prompt import parse_completion  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("UNPARROT_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("UNPARROT_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


@contextmanager
def at_most(seconds: int):
    """A hang (an endless loop on some input) fails the example instead of stopping the suite."""

    def hang(*_):
        raise TimeoutError(f"no answer within {seconds}s: an endless loop?")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _tar(members, fmt=tarfile.USTAR_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


GOOD = _tar(
    [
        _file("a.jpg", jpeg_bytes()),
        _file("a.txt", b"a red square"),
        _file("a.json", b'{"uid": 1}'),
        _file("b.jpg", jpeg_bytes()),
        _file("b.txt", b"two"),
    ],
    tarfile.PAX_FORMAT,
)


# ---- tar / shard reader -------------------------------------------------------------------------
def _read_all(data: bytes) -> list:
    with at_most(20):
        items = list(iter_samples(io.BytesIO(data)))
    assert all(isinstance(x, (RawSample, ShardProblem)) for x in items)
    assert sum(isinstance(x, ShardProblem) for x in items) <= 1  # a break ends the shard
    for x in items:
        if isinstance(x, RawSample) and x.problem is None:
            assert all(unsafe_name(f"{x.key}.{ext}") is None for ext in x.members)
        if isinstance(x, RawSample):
            parse_sample(x, "s")  # a row or field problems, never an exception
    return items


@FUZZ
@given(st.binary(max_size=3000))
def test_tar_reader_never_raises_on_random_bytes(data):
    _read_all(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), max_size=8), st.integers(0, len(GOOD)))
def test_tar_reader_never_raises_on_corrupted_shards(flips, cut):
    data = bytearray(GOOD)
    for pos, val in flips:
        data[pos] = val
    _read_all(bytes(data[:cut]))


def test_pax_record_of_length_zero_is_an_error_not_an_endless_loop():
    """Found by the fuzzer: a pax record whose length field is 0 (or negative) never advanced."""
    info = tarfile.TarInfo("a.txt")
    info.size = 3
    hdr = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    pax = b"0 x=y\n"
    hdr_x = tarfile.TarInfo("././@PaxHeader")
    hdr_x.type, hdr_x.size = tarfile.XHDTYPE, len(pax)
    data = (
        hdr_x.tobuf(tarfile.USTAR_FORMAT) + pax + bytes(512 - len(pax)) + bytes(hdr) + b"abc" + bytes(509) + bytes(1024)
    )
    items = _read_all(data)
    assert "pax record length" in (items[-1].reason if isinstance(items[-1], ShardProblem) else items[-1].problem)


NAMES = st.sampled_from(
    [
        "/etc/passwd.txt",
        "../up.txt",
        "a/../../b.txt",
        "ok/../../x.jpg",
        "C:/win.txt",
        "a\\..\\..\\b.txt",
        "x.txt",
        "d/e.jpg",
        "",
        "n\x00ul.txt",
    ]
)
KINDS = st.sampled_from(
    [
        tarfile.REGTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
        tarfile.FIFOTYPE,
        tarfile.DIRTYPE,
    ]
)


@FUZZ
@given(st.lists(st.tuples(NAMES, KINDS, st.binary(max_size=20)), min_size=1, max_size=6))
def test_hostile_member_names_and_types_are_never_followed(tmp_path_factory, members):
    """Absolute names, `..`, links and devices: such a member marks its sample or is skipped, nothing is
    created on disk, and links or devices are never read as data."""
    out = []
    for name, kind, data in members:
        info = tarfile.TarInfo(name.replace("\x00", "")[:99] or "x.txt")
        info.type = kind
        if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            info.linkname = "/etc/passwd"
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        out.append((info, data if kind == tarfile.REGTYPE else None))
    data = _tar(out, tarfile.GNU_FORMAT)
    where = tmp_path_factory.mktemp("cwd")
    cwd = os.getcwd()
    os.chdir(where)
    try:
        items = _read_all(data)
    finally:
        os.chdir(cwd)
    assert not list(where.iterdir())  # nothing extracted
    regular = {i.name for i, _ in out if i.type == tarfile.REGTYPE}
    for x in items:
        if isinstance(x, RawSample):
            for ext in x.members:
                assert f"{x.key}.{ext}" in regular or x.key in regular or x.problem


# ---- image decoder guard ------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=2000))
@example(jpeg_bytes()[:100])
def test_decoder_raises_only_decode_errors(data):
    with at_most(20):
        try:
            im = open_image(data, max_pixels=1 << 20)
            assert im.mode == "RGB"
        except DecodeError:
            pass


def _png_header(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # a header, an empty pixel-data chunk, the end: nothing to decode
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", b"")
        + chunk(b"IEND", b"")
    )


@FUZZ
@given(st.integers(1, 1 << 20), st.integers(1, 1 << 20))
def test_decompression_bombs_are_refused_by_pixel_count_before_decoding(w, h):
    """A header claiming w x h pixels, with no pixel data at all: over the limit it must be refused as too
    large (decoding would fail differently, on the missing data)."""
    limit = 1 << 16
    try:
        open_image(_png_header(w, h), max_pixels=limit)
        raise AssertionError("an image without pixel data decoded")
    except DecodeError as e:
        assert ("too large" in str(e)) == (w * h > limit), str(e)


# ---- table readers ------------------------------------------------------------------------------
CELLS = st.one_of(
    st.none(),
    st.text(max_size=20),
    st.integers(),
    st.floats(allow_nan=True),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _records(gen):
    recs = []
    with at_most(20):
        try:
            recs = list(gen)
        except (ValueError, KeyError) as e:  # a clear error about the table as a whole (no caption column)
            assert str(e)
    for r in recs:
        assert r.caption is None or isinstance(r.caption, str)
        assert (r.image is None) == bool(r.problem) or r.problem
        json.dumps(r.meta, default=str)
    return recs


@FUZZ
@given(st.binary(max_size=600), st.sampled_from([".csv", ".tsv", ".jsonl"]))
def test_csv_and_jsonl_readers_never_raise_on_random_bytes(tmp_path_factory, data, suffix):
    d = tmp_path_factory.mktemp("t")
    (d / "ok.jpg").write_bytes(jpeg_bytes())
    p = d / f"t{suffix}"
    p.write_bytes(b"filepath,caption\n" + data if suffix == ".csv" else data)
    _records(read_table(p))


@FUZZ
@given(st.lists(st.dictionaries(st.sampled_from(["filepath", "caption", "uid", "x"]), CELLS, max_size=4), max_size=6))
def test_jsonl_reader_keeps_captions_text(tmp_path_factory, rows):
    d = tmp_path_factory.mktemp("t")
    (d / "ok.jpg").write_bytes(jpeg_bytes())
    p = d / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [{"filepath": "ok.jpg", "caption": "first"}] + rows))
    recs = _records(read_table(p))
    assert len(recs) == len(rows) + 1  # one record (or error row) per line: nothing lost


PQ_CELLS = st.one_of(
    st.none(),
    st.text(max_size=20),
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=True),
    st.lists(st.integers(0, 9), max_size=3),
)


@FUZZ
@given(st.lists(st.tuples(st.one_of(st.none(), st.binary(max_size=30)), PQ_CELLS), min_size=1, max_size=6))
def test_parquet_reader_never_raises(tmp_path_factory, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("pq")
    caps = [c for _, c in rows]
    try:
        cap_col = pa.array(caps)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        cap_col = pa.array([json.dumps(c) if c is not None else None for c in caps])
    pq.write_table(pa.table({"jpg": pa.array([b for b, _ in rows], pa.binary()), "caption": cap_col}), d / "t.parquet")
    recs = _records(read_parquet(d / "t.parquet"))
    assert len(recs) == len(rows)


# ---- recipe expressions -------------------------------------------------------------------------
TOKENS = st.sampled_from(
    [
        "has_text",
        "clip_score",
        "caption",
        "texts",
        "and",
        "or",
        "not",
        "(",
        ")",
        "==",
        "!=",
        "<",
        ">=",
        "+",
        "-",
        "*",
        "/",
        "0.5",
        "1e309",
        "9",
        "**",
        '"café"',
        "'x'",
        "true",
        "null",
        "top(",
        "len(",
        "abs(",
        ",",
        ".",
        "__import__",
        "eval",
        ";",
        "lambda",
        "\\",
        '"',
        "é",
    ]
)
TYPES = {"has_text": "bool", "clip_score": "num", "caption": "str", "texts": "list"}
COLS = {
    "has_text": np.array([True, False, True]),
    "clip_score": np.array([0.1, np.nan, 0.9]),
    "caption": np.array(["a", None, "café"], dtype=object),
    "texts": np.array([["a"], [], None], dtype=object),
}


@FUZZ
@given(st.lists(TOKENS, max_size=25).map(" ".join) | st.text(max_size=60))
@example("(" * 5000 + "has_text" + ")" * 5000)
@example("-" * 5000 + "clip_score > 0")
@example("9**9**9")
def test_recipe_expressions_fail_only_as_expr_errors(text):
    """Any text: a tree (then type-checked and evaluated) or an ExprError; nothing is ever evaluated as
    Python, and deep nesting is an ExprError, not a RecursionError."""
    with at_most(20):
        try:
            tree = parse(text)
        except ExprError:
            return
        try:
            check(tree, TYPES, text)
            evaluate(tree, COLS, 3)
        except ExprError:
            pass


# ---- rewrite output parser ----------------------------------------------------------------------
@FUZZ
@given(
    st.one_of(st.none(), st.text(max_size=300)),
    st.sampled_from([None, "stop", "length"]),
    st.one_of(st.none(), st.text(max_size=40)),
)
def test_rewrite_parser_returns_one_clean_line_or_a_reason(completion, finish, source):
    p = parse_completion(completion, finish, source)
    if p.text is None:
        assert p.reason
    else:
        assert p.text == p.text.strip() and "\n" not in p.text and "\r" not in p.text and "  " not in p.text


# ---- captions of any size or encoding -----------------------------------------------------------
@FUZZ
@given(
    st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))),
    st.one_of(st.none(), st.text(max_size=30)),
)
@example(b"x" * 70000, None)
@example(b"ok", "\ud800")
def test_captions_of_any_bytes_make_a_row_or_a_reason(txt, json_caption):
    """A sample's caption (a .txt member of any bytes, or a .json caption with a lone surrogate) gives a
    caption that parquet can store, or a caption problem: never an exception in a stage."""
    members = {"jpg": jpeg_bytes(), "txt": txt}
    if json_caption is not None:
        members = {"jpg": jpeg_bytes(), "json": json.dumps({"caption": json_caption, "uid": json_caption}).encode()}
    row = parse_sample(RawSample("k", members), "s")
    if row["caption"] is not None:
        to_arrow({"caption": [row["caption"]], "uid": [row["uid"]]})
    else:
        assert "caption" in row["problems"]
