"""The demo's protocol: it loads and is checked, and its findings' verdicts come from saved per-item outcomes."""

import json

import numpy as np
import pytest
import yaml

from unparrot.evaluate.results import write_outcomes
from unparrot.protocol import PROTOCOLS, load_protocol, verdicts


def test_builtin_protocol_loads_with_dated_changes_and_every_finding_checked():
    p = load_protocol("demo")
    assert p.changes and all("date" in c for c in p.changes)
    assert {"small", "default", "full"} <= set(p.sizes) and p.sizes["default"].er is None
    assert p.sizes["full"].er and set(p.er_runs("full")) == set(p.er["family"]) | set(p.er["treatments"])
    ids = [f["id"] for f in p.findings]
    assert {"er-diverse-covered", "er-diverse-uncovered", "er-language", "er-size", "reads-attack-debiased"} <= set(ids)
    # the full-size ER family: one image is at most 0.2 points on every evaluation set (500 images)
    assert p.sizes["full"].er["eval_per_class"] * 10 >= 500


def _edited(tmp_path, edit) -> str:
    d = yaml.safe_load((PROTOCOLS / "demo.yaml").read_text())
    edit(d)
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(d))
    return str(f)


def test_adding_a_model_and_a_finding_is_a_yaml_edit_and_mistakes_are_caught(tmp_path):
    def add(d):
        d["models"]["deparrot"] = {"subset": "all"}
        d["findings"].append({"id": "x", "finding": "f", "treatment": "deparrot", "control": "all",
                              "metric": "acc", "set": "clean", "claim": "+"})

    p = load_protocol(_edited(tmp_path, add))
    assert "deparrot" in p.models and p.findings[-1]["id"] == "x"
    with pytest.raises(ValueError, match="not a model"):
        load_protocol(_edited(tmp_path, lambda d: d["findings"][0].update(control="nope")))
    with pytest.raises(ValueError, match="direction"):
        load_protocol(_edited(tmp_path, lambda d: d["findings"][0].update(claim="up")))
    with pytest.raises(ValueError, match="dated"):
        load_protocol(_edited(tmp_path, lambda d: d.update(changes=[])))
    with pytest.raises(FileNotFoundError, match="built-in"):
        load_protocol("no-such-protocol")


def _zeroshot(run, model, dataset, correct, attack=None):
    n = len(correct)
    label = np.arange(n) % 10
    pred = np.where(np.asarray(correct) > 0, label, (label + 1) % 10)
    write_outcomes(run / "results", model, "zeroshot", dataset, {
        "key": np.array([f"s{i:05d}" for i in range(n)]), "label": label, "pred": pred,
        "attack_label": np.full(n, -1) if attack is None else attack})


def test_verdicts_from_saved_outcomes_one_seed_and_pooled(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    for s in range(3):
        run = tmp_path / f"seed{s}"
        _zeroshot(run, "parrot-debiased", "clean", rng.random(500) < 0.8)
        _zeroshot(run, "all", "clean", rng.random(500) < 0.5)
        runs.append(run)
    p = load_protocol("demo")
    one = {v["id"]: v for v in verdicts(runs[:1], p)}
    assert one["debiased-sees"]["verdict"] == "holds" and one["debiased-sees"]["low"] > 0.2
    assert one["laclip-clean"]["verdict"] == "not run"  # no laclip outcomes in these runs
    assert one["er-size"]["verdict"] == "not run"
    pooled = {v["id"]: v for v in verdicts(runs, p)}["debiased-sees"]
    assert pooled["verdict"] == "holds" and len(pooled["per_seed"]) == 3
    again = {v["id"]: v for v in verdicts(runs, p)}["debiased-sees"]
    assert (again["low"], again["high"]) == (pooled["low"], pooled["high"])  # seeded


def test_er_verdict_against_a_separate_family(tmp_path):
    """A family on one logit-linear trend; a treatment 15 points above it on the shift: ER holds; a
    treatment on the line: the equivalence claim holds."""
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    lg = lambda q: np.log(q / (1 - q))  # noqa: E731
    rng = np.random.default_rng(1)
    n = 4000
    run = tmp_path / "run"
    res = run / "er" / "results"

    def model(name, acc_id, acc_ood):
        for d, a in (("clean", acc_id), ("shift-background", acc_ood), ("shift-sketch", acc_ood),
                     ("shift-invert", acc_ood)):
            c = rng.random(n) < a
            label = np.arange(n) % 10
            write_outcomes(res, name, "zeroshot", d, {"key": np.array([f"k{i}" for i in range(n)]), "label": label,
                                                      "pred": np.where(c, label, (label + 1) % 10)})

    points = []
    for i, a in enumerate([0.3, 0.45, 0.6, 0.75, 0.9]):
        model(f"fam{i}", a, sig(0.8 * lg(a) - 0.5))
        points.append(f"fam{i}")
    model("diverse", 0.6, sig(0.8 * lg(0.6) - 0.5) + 0.15)
    model("narrow-4x", 0.7, sig(0.8 * lg(0.7) - 0.5))
    model("classname", 0.5, sig(0.8 * lg(0.5) - 0.5))
    (run / "er" / "points.json").write_text(json.dumps({"family_points": points}))
    p = load_protocol("demo")
    p.verdict = dict(p.verdict, n_boot=200)
    vs = {v["id"]: v for v in verdicts([run], p)}
    assert vs["er-diverse-covered"]["verdict"] == "holds" and 0.1 < vs["er-diverse-covered"]["estimate"] < 0.2
    assert vs["er-size"]["verdict"] == "holds" and abs(vs["er-size"]["estimate"]) < 0.02
    assert vs["er-language"]["verdict"] == "holds"
