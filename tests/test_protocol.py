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
        d["findings"].append(
            {
                "id": "x",
                "finding": "f",
                "treatment": "deparrot",
                "control": "all",
                "metric": "acc",
                "set": "clean",
                "claim": "+",
            }
        )

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
    write_outcomes(
        run / "results",
        model,
        "zeroshot",
        dataset,
        {
            "key": np.array([f"s{i:05d}" for i in range(n)]),
            "label": label,
            "pred": pred,
            "attack_label": np.full(n, -1) if attack is None else attack,
        },
    )


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
        for d, a in (
            ("clean", acc_id),
            ("shift-background", acc_ood),
            ("shift-sketch", acc_ood),
            ("shift-invert", acc_ood),
        ):
            c = rng.random(n) < a
            label = np.arange(n) % 10
            write_outcomes(
                res,
                name,
                "zeroshot",
                d,
                {
                    "key": np.array([f"k{i}" for i in range(n)]),
                    "label": label,
                    "pred": np.where(c, label, (label + 1) % 10),
                },
            )

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


def test_deparrot_model_and_its_findings_are_in_the_protocol(tmp_path):
    p = load_protocol("demo")
    assert p.models["deparrot"] == {
        "subset": "deparrot",
        "rewrites": False,
        "train_args": [],
        "caption_column": "deparrot_caption",
    }
    assert "deparrot" in p.sizes["small"].models and "deparrot" in p.sizes["full"].models
    assert "deparrot" not in p.sizes["default"].models  # protocol decision: make demo keeps its budget
    by = {f["id"]: f for f in p.findings}
    keeps = by["deparrot-keeps"]
    assert (keeps["metric"], keeps["claim"], keeps["ratio"], keeps["control"]) == (
        "kept_ratio",
        "+",
        1.25,
        "parrot-debiased",
    )
    for i, metric in (("deparrot-reads-attack", "attack_success"), ("deparrot-reads-sync", "sync_gap")):
        assert (by[i]["metric"], by[i]["claim"], by[i]["control"]) == (metric, "-", "parrot-debiased")
        assert p.claim(by[i]).margin > 0  # "no more than": non-inferiority, not "less than"
    assert by["deparrot-reads-attack"]["control_set"] == "attack-control"
    for i in ("deparrot-sees", "deparrot-sees-shifts"):
        assert (by[i]["claim"], by[i]["control"], p.claim(by[i]).margin) == ("+", "all", 0.044)
    assert by["deparrot-sees-shifts"]["set"] == ["shift-background", "shift-sketch", "shift-invert"]
    with pytest.raises(ValueError, match="caption_column"):  # rewrites of the original captions re-parrot
        load_protocol(_edited(tmp_path, lambda d: d["models"]["deparrot"].update(rewrites=True)))
    with pytest.raises(ValueError, match="ratio"):
        load_protocol(_edited(tmp_path, lambda d: by_id(d, "deparrot-keeps").pop("ratio")))
    with pytest.raises(ValueError, match="control_set"):
        load_protocol(_edited(tmp_path, lambda d: by_id(d, "deparrot-sees").update(control_set="attack-control")))


def by_id(d: dict, i: str) -> dict:
    return next(f for f in d["findings"] if f["id"] == i)


def test_attack_success_net_of_the_control_word_and_shifts_averaged_per_image(tmp_path):
    """A deparrot model that names the written wrong class on 30% of attacked images but just as often
    when a non-class word stands there is not reading (net zero): the "no more than" claim holds; one
    that names it only when the class name is written fails. Shift accuracy is per image over 3 sets."""
    n = 500
    wrong = (np.arange(n) % 10 + 1) % 10
    occluded = np.arange(n) % 10 < 3
    p = load_protocol("demo")
    p.verdict = dict(p.verdict, n_boot=200)
    out = {}
    for case, control_names in (("occlusion", True), ("reading", False)):
        run = tmp_path / case
        _zeroshot(run, "parrot-debiased", "attack", np.ones(n), attack=wrong)  # correct: never reads
        _zeroshot(run, "parrot-debiased", "attack-control", np.ones(n))
        label = np.arange(n) % 10
        for d, names in (("attack", True), ("attack-control", control_names)):
            pred = np.where(occluded & names, wrong, label)
            write_outcomes(
                run / "results",
                "deparrot",
                "zeroshot",
                d,
                {
                    "key": np.array([f"s{i:05d}" for i in range(n)]),
                    "label": label,
                    "pred": pred,
                    "attack_label": wrong if d == "attack" else np.full(n, -1),
                },
            )
        for d in ("shift-background", "shift-sketch", "shift-invert"):
            _zeroshot(run, "all", d, np.arange(n) % 2 == 0)
            _zeroshot(run, "deparrot", d, (np.arange(n) % 2 == 0) if case == "occlusion" else np.zeros(n))
        out[case] = {v["id"]: v for v in verdicts([run], p)}
    assert out["occlusion"]["deparrot-reads-attack"]["verdict"] == "holds"
    assert out["occlusion"]["deparrot-reads-attack"]["estimate"] == 0.0
    assert out["reading"]["deparrot-reads-attack"]["verdict"] == "fails"
    assert abs(out["reading"]["deparrot-reads-attack"]["estimate"] - 0.3) < 1e-9
    shifts = out["occlusion"]["deparrot-sees-shifts"]
    assert shifts["verdict"] == "holds" and shifts["n_items"] == [n]  # images, not images x sets
    assert out["reading"]["deparrot-sees-shifts"]["verdict"] == "fails"
    assert out["occlusion"]["deparrot-keeps"]["verdict"] == "not run"  # no pool in these runs


def test_kept_ratio_statistic_against_the_claimed_ratio():
    from unparrot.evaluate.verdicts import Claim, bootstrap, judge
    from unparrot.protocol import kept_ratio_statistic

    stat = kept_ratio_statistic(1.25)
    pool = np.arange(2000)
    control = (pool % 4 < 2).astype(float)  # half the pool
    for share, verdict in ((0.75, "holds"), (0.55, "fails")):
        treatment = (pool < share * len(pool)).astype(float)
        iv = bootstrap([{"treatment": treatment, "control": control}], stat, 200)
        assert abs(iv.estimate - (share / 0.5 - 1.25)) < 1e-9
        assert judge(iv, Claim("+")).verdict == verdict
