"""Crash-resume of the stages with real operators (issue 12, section 1): parrot, embed (a tiny open_clip
model with random weights, on CPU), spot with the real rapidocr, and evaluate. Each is killed just before
3 seeded renames (`kill_points` over `count_renames`, as tests/test_reliability.py), rerun, and compared
with an uninterrupted run: column, error and embedding files byte for byte, `unparrot verify` passing;
evaluate's result JSON equal except its timing field (`metrics.seconds`) and its outcomes equal array for
array (an .npz's zip headers hold the time of writing)."""

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import KILLED, count_renames, kill_points, run_killed, tree_bytes
from unparrot.engine import run_stage
from unparrot.verify import verify


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory):
    """A learnable world of 24 samples in 4 shards, the spot stage done with the oracle (ground truth)."""
    from unparrot.synth.generate import synth

    root = tmp_path_factory.mktemp("small") / "pool"
    synth(root, n=24, preset="learnable", seed=5, shard_size=6, eval_per_class=2, workers=1, progress=False)
    run_stage(root, "spot", {"backend": "oracle"}, progress=False)
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """Random weights of the unparrot-rn-tiny architecture, saved once: every run loads the same model."""
    from unparrot.models import load_clip

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    torch.save({"state_dict": load_clip("unparrot-rn-tiny").model.state_dict(), "epoch": 0}, path)
    return str(path)


@pytest.fixture
def one_thread():
    """The killed child runs torch on one thread (run_killed: thread pools do not survive fork); the
    uninterrupted run and the rerun must too, or float32 sums in another order differ in the last bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _assert_resumes(src, tmp_path, run, outputs, seed, check=None, pool=True):
    """run(root) on a copy of src uninterrupted; then, on a fresh copy each, killed before 3 seeded renames
    and run again: the files under `outputs` (folders relative to the root) equal the uninterrupted run's
    (`check(root)` when given, instead of bytes), no temp file is left and (a `pool`) the pool verifies."""
    snap = check or (lambda root: {d: tree_bytes(root / d) for d in outputs})
    clean = shutil.copytree(src, tmp_path / "clean")
    run(clean)
    want = snap(clean)
    total = count_renames(lambda: run(shutil.copytree(src, tmp_path / "count")))
    assert total >= 3, total
    for n in kill_points(total, 3, seed):
        p = shutil.copytree(src, tmp_path / f"k{n}")
        assert run_killed(lambda p=p: run(p), n) == KILLED
        assert snap(p) != want, n  # the kill left the work unfinished
        run(p)
        assert snap(p) == want, n
        assert not list(p.rglob(".*.tmp")) and not list(p.rglob("*.tmp*")), n
        assert not pool or verify(p).ok, verify(p).line()
    return want


def _stage_files(*stages):
    return [f"{d}/{s}" for s in stages for d in ("columns", "errors")]


def test_killed_parrot_stage_resumes_to_the_same_files(small_pool, tmp_path):
    """The parrot stage (CoTR over spot's texts) killed before 3 seeded renames: the rerun ends with the
    column and error files of an uninterrupted run."""
    want = _assert_resumes(
        small_pool,
        tmp_path,
        lambda root: run_stage(root, "parrot", progress=False),
        _stage_files("parrot"),
        seed=21,
    )
    assert len([f for f in want["columns/parrot"] if f.endswith(".parquet")]) == 4


def test_killed_embed_stage_resumes_to_the_same_files(small_pool, tmp_path, tiny_ckpt, one_thread):
    """embed with a real (tiny, random) open_clip model killed before 3 seeded renames: columns, errors
    and the embedding arrays equal an uninterrupted run's, byte for byte."""
    params = {"model": "unparrot-rn-tiny", "pretrained": tiny_ckpt}
    want = _assert_resumes(
        small_pool,
        tmp_path,
        lambda root: run_stage(root, "embed", params, progress=False),
        [*_stage_files("embed"), "embeddings/embed"],
        seed=22,
    )
    assert len([f for f in want["embeddings/embed"] if f.endswith(".npy")]) == 8  # image + text, 4 shards


def test_killed_spot_stage_with_rapidocr_resumes_to_the_same_files(small_pool, tmp_path):
    """spot with the real rapidocr (onnxruntime, CPU; its models ship with the package) killed before 3
    seeded renames: the OCR results equal an uninterrupted run's byte for byte (about 11 s here)."""
    _assert_resumes(
        small_pool,
        tmp_path,
        lambda root: run_stage(root, "spot", stage="ocr", progress=False),
        _stage_files("ocr"),
        seed=23,
    )


def _eval_set(root):
    from PIL import Image

    from unparrot.evaluate.datasets import write_set

    rows = [
        {"key": f"k{c}_{j}", "image": Image.new("RGB", (32, 32), col), "label": c, "meta": {"captions": [f"c{c}"]}}
        for c, col in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)])
        for j in range(3)
    ]
    write_set(root, rows, ["red", "green", "blue"], ["a {c} square"])
    return root


def _results(out):
    """{file: content} of an evaluate output folder: result JSON without `metrics.seconds` (timing), the
    outcome arrays as lists."""
    got = {}
    for f in sorted(out.rglob("*")):
        if f.suffix == ".json":
            rec = json.loads(f.read_text())
            rec["metrics"].pop("seconds")
            got[str(f.relative_to(out))] = rec
        elif f.suffix == ".npz":
            z = np.load(f)
            got[str(f.relative_to(out))] = {k: z[k].tolist() for k in z.files}
        elif f.is_file():
            got[str(f.relative_to(out))] = f.read_bytes()
    return got


def test_killed_evaluate_resumes_to_the_same_results(tmp_path, tiny_ckpt, one_thread):
    """evaluate (zeroshot, retrieval, sync) killed before 3 seeded renames of its outcome and result files:
    the rerun computes what is missing and ends with the results of an uninterrupted run (all but the
    timing field `metrics.seconds`), no temp file left."""
    from unparrot.evaluate import evaluate

    src = tmp_path / "src"
    _eval_set(src / "set")
    sets = {"tiny": str(src / "set")}

    def run(root):
        evaluate(
            "unparrot-rn-tiny",
            tiny_ckpt,
            datasets=sets,
            tasks=("zeroshot", "retrieval", "sync"),
            out=root / "res",
            name="rand",
            sync_words=["red", "green", "blue"],
            progress=False,
        )

    want = _assert_resumes(src, tmp_path, run, [], seed=24, check=lambda root: _results(root / "res"), pool=False)
    assert {k.split("/")[-1] for k in want} >= {"zeroshot__tiny.json", "retrieval__tiny.json"}


def test_prefetch_works_in_a_forked_child():
    """Regression: after `prefetch` ran in a process, a child forked from it (run_killed, a forking engine)
    waited forever in its first `prefetch`: the executor's helper thread does not survive fork, and the
    executor, counting it, never started another. The alarm turns a hang into a failure."""
    import os
    import signal

    from unparrot.prefetch import prefetch

    assert list(prefetch(lambda x: x + 1, range(3))) == [1, 2, 3]
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)
        os._exit(0 if list(prefetch(lambda x: x * 2, range(3))) == [0, 2, 4] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # -SIGALRM when the child hung
