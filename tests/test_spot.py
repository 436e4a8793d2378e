import io
import shutil

import pytest
from PIL import Image

from helpers import write_tar
from unparrot.engine import run_stage
from unparrot.ops.spot import Spot, polygon_union_area
from unparrot.pool import Pool


def test_polygon_union_area():
    a = [[0, 0], [10, 0], [10, 10], [0, 10]]
    b = [[5, 5], [15, 5], [15, 15], [5, 15]]
    assert polygon_union_area([a], 20, 20) == pytest.approx(100 / 400)
    assert polygon_union_area([a, b], 20, 20) == pytest.approx(175 / 400)  # overlap counted once
    assert polygon_union_area([[[15, 15], [30, 15], [30, 30], [15, 30]]], 20, 20) == pytest.approx(25 / 400)  # clipped
    assert polygon_union_area([], 20, 20) == 0.0


def test_oracle_is_exact(synth_pool, tmp_path):
    pool = Pool(shutil.copytree(synth_pool, tmp_path / "p"))
    s = run_stage(pool, "spot", {"backend": "oracle"}, progress=False)
    assert s.n_err == 0 and s.n_ok == 300
    df = pool.load("spot")
    truth = {r["uid"]: r["meta"]["synth"]["texts"] for r in pool.samples()}
    for r in df.to_dict("records"):
        t = truth[r["uid"]]
        assert r["has_text"] == bool(t) and r["n_text"] == len(t) and list(r["texts"]) == [x["text"] for x in t]
        assert (r["text_area"] > 0) == bool(t) and (r["width"], r["height"]) == (64, 64)


def test_rapidocr_agrees_with_oracle_on_the_learnable_world(synth_pool, tmp_path):
    pool = Pool(shutil.copytree(synth_pool, tmp_path / "p"))
    run_stage(pool, "spot", {"backend": "oracle"}, stage="truth", progress=False)
    s = run_stage(pool, "spot", shards=["00000"], progress=False)  # 100 real OCR runs
    assert s.n_err == 0
    df = pool.load(["spot"]).merge(pool.load("truth", columns=["has_text", "texts"]), on="uid", suffixes=("", "_true"))
    agree = (df["has_text"] == df["has_text_true"]).mean()
    assert agree >= 0.9, agree
    read = [w for t, tt in zip(df["texts"], df["texts_true"]) for w in tt if any(w in x.lower() for x in t)]
    assert len(read) >= 0.8 * sum(len(tt) for tt in df["texts_true"])


def _png(mode, size, color, **kw):
    b = io.BytesIO()
    Image.new(mode, size, color).save(b, format=kw.pop("fmt", "PNG"), **kw)
    return b.getvalue()


def test_odd_images_go_through_or_become_error_rows(tmp_path):
    frames = [Image.new("P", (40, 30), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    cases = {
        "tiny": _png("RGB", (1, 1), (0, 0, 0)),
        "gray": _png("L", (50, 40), 100),
        "cmyk": _png("CMYK", (50, 40), (0, 50, 0, 0), fmt="JPEG"),
        "alpha": _png("RGBA", (50, 40), (0, 0, 0, 0)),
        "sixteen": _png("I;16", (50, 40), 30000),
        "palette": _png("P", (50, 40), 5),
        "animated": gif.getvalue(),
        "huge": _png("L", (9000, 8000), 0),
        "broken": b"\x89PNG\r\n\x1a\nbroken",
    }
    members = []
    for k, data in cases.items():
        members += [(f"{k}.png", data), (f"{k}.txt", b"caption")]
    write_tar(tmp_path / "shards" / "0.tar", members)
    s = run_stage(tmp_path, "spot", progress=False)
    assert s.n_in == len(cases) == s.n_ok + s.n_err
    errs = dict(zip(Pool(tmp_path).errors("spot")["key"], Pool(tmp_path).errors("spot")["reason"]))
    assert set(errs) == {"huge", "broken"}
    assert "too large" in errs["huge"] and "cannot decode" in errs["broken"]
    df = Pool(tmp_path).load("spot")
    assert not df["has_text"].any()


class ExplodingSpotter:
    """Test double: raises on images whose top-left pixel is pure red."""

    needs_image = True

    def spot(self, images, metas):
        out = []
        for im in images:
            if tuple(im[0, 0]) == (255, 0, 0):
                raise RuntimeError("boom")
            out.append([([[0, 0], [4, 0], [4, 4], [0, 4]], "ok text", 0.9)])
        return out


def test_ocr_exception_never_stops_a_run(tmp_path):
    members = []
    for i in range(6):
        color = (255, 0, 0) if i in (2, 4) else (0, 0, 255)
        members += [(f"s{i}.png", _png("RGB", (20, 20), color)), (f"s{i}.txt", f"caption {i}".encode())]
    write_tar(tmp_path / "shards" / "0.tar", members)
    s = run_stage(tmp_path, "spot", {"backend": f"{__name__}:ExplodingSpotter"}, batch_size=6, progress=False)
    assert (s.n_ok, s.n_err) == (4, 2)
    errs = Pool(tmp_path).errors("spot")
    assert sorted(errs["key"]) == ["s2", "s4"] and all("OCR failed: RuntimeError: boom" in r for r in errs["reason"])


class MalformedSpotter:
    """A plug-in spotter whose answers are malformed for some images (2-point boxes, NaN, no score)."""

    needs_image = True

    def __init__(self, **_):
        pass

    def spot(self, images, metas):
        good = ([[0, 0], [4, 0], [4, 4], [0, 4]], "ok text", 0.9)
        bad = [
            [([[0, 0], [4, 4]], "two points", 0.9)],
            [([[0, 0], [4, 0], [float("nan"), 4], [0, 4]], "nan", 0.9)],
            [("not a box",)],
        ]
        return [[good] if i % 2 == 0 else bad[(i // 2) % 3] for i in range(len(images))]


def test_malformed_spotter_output_costs_only_its_image(tmp_path):
    members = []
    for i in range(6):
        members += [(f"s{i}.png", _png("RGB", (20, 20), (0, 0, 255))), (f"s{i}.txt", f"caption {i}".encode())]
    write_tar(tmp_path / "shards" / "0.tar", members)
    s = run_stage(tmp_path, "spot", {"backend": f"{__name__}:MalformedSpotter"}, batch_size=6, progress=False)
    assert (s.n_ok, s.n_err) == (3, 3)
    errs = Pool(tmp_path).errors("spot")
    assert sorted(errs["key"]) == ["s1", "s3", "s5"]
    assert all(r.startswith("OCR failed: malformed spotter output") for r in errs["reason"])


def test_filters():
    op = Spot(backend="oracle", min_score=0.5, min_area=10, min_chars=2)
    q = [[0, 0], [10, 0], [10, 5], [0, 5]]
    assert op.keep(q, "ab", 0.9)
    assert not op.keep(q, "a", 0.9)  # a single glyph
    assert not op.keep(q, "ab", 0.4)
    assert not op.keep([[0, 0], [2, 0], [2, 2], [0, 2]], "ab", 0.9)
    with pytest.raises(ValueError):
        Spot(backend="oracle", min_score=2)
    with pytest.raises(KeyError, match="unknown OCR backend"):
        Spot(backend="nope")


def test_oracle_without_truth_is_an_error(tmp_path):
    write_tar(tmp_path / "shards" / "0.tar", [("a.png", _png("RGB", (8, 8), (1, 1, 1))), ("a.txt", b"c")])
    s = run_stage(tmp_path, "spot", {"backend": "oracle"}, progress=False)
    assert s.n_err == 1 and "ground truth" in Pool(tmp_path).errors("spot")["reason"][0]
