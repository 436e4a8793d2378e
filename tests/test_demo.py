"""`unparrot demo --size small`: the whole pipeline end to end (the findings are not expected at this size)."""

import json
import os
import subprocess
import sys

import pytest

from unparrot.demo import MODELS, SIZES, demo, model_numbers, seeds_summary


def test_unknown_size_or_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown demo size"):
        demo(out=tmp_path, size="huge")
    with pytest.raises(ValueError, match="unknown demo models"):
        demo(out=tmp_path, size="small", models=["all", "nope"])


@pytest.mark.slow
def test_small_demo_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "unparrot", "demo", "--size", "small", "--out", str(out), "--seed", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for step in range(1, 7):
        assert f"[{step}/6]" in r.stdout
    chosen = SIZES["small"].models
    # every model trained, evaluated on every set, and in the printed table
    for m in chosen:
        assert (out / "runs" / m / "checkpoints" / "final.pt").exists()
        assert f"| {m} |" in r.stdout
        for d in ("clean", "attack", "attack-control", "shift-background", "shift-sketch", "shift-invert"):
            res = json.loads((out / "results" / m / f"zeroshot__{d}.json").read_text())
            assert 0.0 <= res["metrics"]["acc1"] <= 1.0
        sync = json.loads((out / "results" / m / "sync__rendered-vocab.json").read_text())
        assert -1.0 <= sync["metrics"]["sync_gap"] <= 1.0
    # the LaCLIP model saw rewritten captions, produced by the real local LLM
    assert "rewrite:" in r.stdout and " 0 new from" not in r.stdout
    summary = json.loads((out / "demo.json").read_text())
    names = [f["finding"] for f in summary["findings"]]
    assert any("CLIP-score filtering" in n for n in names) and any("T-MARS" in n for n in names)
    assert all(f["holds"] in (True, False) for f in summary["findings"])  # every finding measured at this size
    html = (out / "report.html").read_text()
    assert "findings" in html.lower() and "less-is-more" in html
    assert str(out / "report.html") in r.stdout
    # a rerun resumes: nothing is retrained, the answer is the same
    mtimes = {m: (out / "runs" / m / "checkpoints" / "final.pt").stat().st_mtime_ns for m in chosen}
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert mtimes == {m: (out / "runs" / m / "checkpoints" / "final.pt").stat().st_mtime_ns for m in chosen}
    assert json.loads((out / "demo.json").read_text())["findings"] == summary["findings"]
    assert set(chosen) <= set(MODELS)
    # the seeds summary: the same run twice has zero spread, and every finding is tallied
    nums = model_numbers(out)
    table = seeds_summary([out, out])
    clean = nums["all"]["clean acc"]
    assert f"| all | {clean:.3f} ± 0.000 |" in table
    for f in summary["findings"]:
        assert f"| {f['finding']} | {2 * int(f['holds'])}/2 runs |" in table
