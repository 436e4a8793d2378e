"""`unparrot demo --size small`: the whole pipeline end to end (the findings are not expected at this size)."""

import json
import os
import re
import subprocess
import sys

import pytest

from unparrot.demo import demo, model_numbers, seeds_summary
from unparrot.io.tar import RawSample, iter_samples
from unparrot.pool import Pool
from unparrot.protocol import load_protocol

PROTO = load_protocol("demo")


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
    chosen = PROTO.sizes["small"].models
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
    by = {f["id"]: f for f in summary["findings"]}
    assert set(by) == {f["id"] for f in PROTO.findings}  # the findings come from the protocol
    for f in summary["findings"]:
        assert f["verdict"] in ("holds", "fails", "inconclusive", "not run")
        assert f"[{f['verdict']}] {f['id']}" in r.stdout
        if f["verdict"] != "not run":
            assert f["low"] <= f["high"] and f["text"].startswith(f"{f['estimate']:+.4f} [")
    needs_random = {f["id"] for f in PROTO.findings if "random" in (f.get("treatment"), f.get("control"))}
    assert all(by[i]["verdict"] == "not run" for i in needs_random)  # small trains no random model
    check_deparrot_model(out, r.stdout, by)
    # the ER design ran in miniature: a separate family (with its checkpoints) and three treatments
    points = json.loads((out / "er" / "points.json").read_text())
    assert len(points["family_points"]) > len(PROTO.er["family"]) and len(points["treatments"]) == 3
    assert all(by[f["id"]]["verdict"] != "not run" for f in PROTO.findings if f["metric"] == "er")
    assert (out / "robustness.png").stat().st_size > 5000
    er = json.loads(next((out / "er" / "results" / "diverse").glob("robustness__*.json")).read_text())
    assert "diverse" not in er["metrics"]["baselines"]
    html = (out / "report.html").read_text()
    assert "findings" in html.lower() and "less-is-more" in html and "difference [95% CI]" in html
    assert str(out / "report.html") in r.stdout
    # a rerun resumes: nothing is retrained, the answer is the same
    mtimes = {m: (out / "runs" / m / "checkpoints" / "final.pt").stat().st_mtime_ns for m in chosen}
    r2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert mtimes == {m: (out / "runs" / m / "checkpoints" / "final.pt").stat().st_mtime_ns for m in chosen}
    assert json.loads((out / "demo.json").read_text())["findings"] == summary["findings"]
    assert not re.search(r"\] training \S+ \.\.\.", r2.stdout)  # nothing trained twice
    # the seeds summary: the same run twice has zero spread, and every finding gets a pooled verdict
    nums = model_numbers(out)
    table = seeds_summary([out, out])
    clean = nums["all"]["clean acc"]
    assert f"| all | {clean:.3f} ± 0.000 |" in table
    assert "pooled verdicts over 2 runs" in table
    for f in summary["findings"]:
        assert f"] {f['id']} (" in table


def check_deparrot_model(out, stdout: str, by: dict):
    """The deparrot model trained on shards whose captions are the deparrot stage's, its samples kept are
    in the table, and its findings were measured (a helper, so a finished demo folder can be checked)."""
    assert (
        "deparrot" in PROTO.sizes["small"].models and (out / "runs" / "deparrot" / "checkpoints" / "final.pt").exists()
    )
    pool = Pool(out / "pool")
    dp = pool.load("deparrot", columns=["deparrot_caption", "deparrot_mode"]).set_index("uid")
    new, mode = dp["deparrot_caption"].to_dict(), dp["deparrot_mode"].to_dict()
    shards = sorted((out / "subsets" / "deparrot@deparrot_caption" / "shards").glob("*.tar"))
    assert shards
    seen, changed = 0, 0
    for sh in shards:
        for x in iter_samples(sh):
            assert isinstance(x, RawSample)
            uid = json.loads(x.members["json"])["uid"]
            txt = x.members["txt"].decode()
            assert new[uid] is not None and txt == new[uid]  # the de-parroted caption, never a null one
            seen += 1
            changed += mode[uid] == "strip"
    kept = json.loads(pool.subset_path("deparrot").with_suffix(".json").read_text())["kept"]
    assert changed > 0  # parroted captions kept their images, with the spelled words taken out
    assert seen == kept and f"| deparrot | deparrot ({kept}), captions: deparrot_caption |" in stdout
    for i in (
        "deparrot-keeps",
        "deparrot-reads-attack",
        "deparrot-reads-sync",
        "deparrot-sees",
        "deparrot-sees-shifts",
    ):
        assert by[i]["verdict"] in ("holds", "fails", "inconclusive"), i
