"""`unparrot audit`: the measurements on known embeddings, bad input, the card end to end (random weights),
the card in Chromium, and (slow) validity on two tiny models whose behaviour is known."""

import json
import shutil

import numpy as np
import pytest
import torch

from unparrot.cli import main
from unparrot.evaluate import audit_metrics as am
from unparrot.evaluate.audit import AuditConfig, audit, load_vocabulary, resolve_models
from unparrot.evaluate.results import read_results, results_table


# ---- measurements on known embeddings -------------------------------------------------------------
def test_bootstrap_is_seeded_and_covers_the_mean():
    v = np.r_[np.ones(200), np.zeros(200)]
    a, b = am.mean_interval(v, 2000, seed=1), am.mean_interval(v, 2000, seed=1)
    assert a == b and a != am.mean_interval(v, 2000, seed=2)
    half = 1.96 * np.sqrt(0.25 / 400)  # normal approximation of the mean of 400 fair coins
    assert a[0] < 0.5 < a[1] and abs((a[1] - a[0]) / 2 - half) < 0.2 * half
    assert am.mean_interval(np.full(50, 0.3), 100) == pytest.approx((0.3, 0.3))
    assert np.isnan(am.mean_interval([], 100)[0])


def test_sync_and_reading_of_a_perfect_reader_and_a_blind_model():
    V = 5
    T = np.eye(V)
    word_of = np.repeat(np.arange(V), 3)
    perms = am.derangements(V, 4, seed=0)
    assert perms.shape == (4, V) and not (perms == np.arange(V)).any()
    reader = am.sync_measures(T[word_of], T, word_of, perms, 200)
    assert reader["sync_mean"] == 1 and reader["sync_std"] == 0 and reader["sync_gap"] == 1
    assert reader["sync_gap_ci95"] == [1.0, 1.0] and reader["n_renders"] == 15
    read, margin = am.word_reading(T[word_of], T, word_of, 200)
    assert read["read_top1"] == 1 and read["chance"] == pytest.approx(0.2) and np.allclose(margin, 1)
    blind = np.full((15, V), 1 / np.sqrt(V))  # every rendering looks the same
    s = am.sync_measures(blind, T, word_of, perms, 200)
    assert s["sync_mean"] == pytest.approx(1 / np.sqrt(V)) and s["sync_gap"] == pytest.approx(0, abs=1e-12)
    r, m = am.word_reading(blind, T, word_of, 200)
    assert r["read_top1"] == pytest.approx(1 / V) and np.allclose(m, 0)  # ties: argmax takes word 0


def test_sync_hand_computed():
    T = np.array([[1.0, 0.0], [0.0, 1.0]])
    c = np.array([0.6, 0.8])
    I = np.array([[1.0, 0.0], c, [0.0, 1.0], [0.8, 0.6]])  # renders of word 0, 0, 1, 1
    word_of = np.array([0, 0, 1, 1])
    s = am.sync_measures(I, T, word_of, np.array([[1, 0]]), 200)
    matched = np.array([1.0, 0.6, 1.0, 0.6])
    assert s["sync_mean"] == pytest.approx(0.8) and s["sync_std"] == pytest.approx(matched.std())
    assert s["mismatched_mean"] == pytest.approx((0 + 0.8 + 0 + 0.8) / 4) and s["sync_gap"] == pytest.approx(0.4)
    r, margin = am.word_reading(I, T, word_of, 200)
    assert r["read_top1"] == 0.5 and np.allclose(margin, [1, -0.2, 1, -0.2])


def test_attack_and_reliance_hand_computed():
    y = np.array([0, 1, 2, 0, 1])
    m = am.attack_measures(y, [0, 1, 2, 1, 1], [2, 1, 0, 1, 0], [0, 1, 2, 0, 0], [2, 0, 0, 1, 0], 3, 300)
    assert m["clean_acc1"] == pytest.approx(0.8) and m["attacked_acc1"] == pytest.approx(0.2)
    assert m["control_acc1"] == pytest.approx(0.8) and m["attack_success_rate"] == pytest.approx(0.8)
    assert m["chance"] == pytest.approx(1 / 3) and m["clean_acc1_ci95"][0] <= 0.8 <= m["clean_acc1_ci95"][1]
    assert am.flipped(y, [0, 1, 2, 1, 1], [2, 1, 0, 1, 0], [2, 0, 0, 1, 0]).tolist() == [0, 2, 4]
    s = np.array([0.5, 0.5, 0.3, 0.1])
    sm = np.array([0.1, 0.45, 0.3, 0.1])
    sx = np.full(4, 0.1)  # baseline 0.1: pair 0 loses all its margin, pair 1 a eighth, pair 3 has none
    r = am.text_reliance(s, sm, sx, 0.5, 300)
    assert r["carried_share"] == pytest.approx(0.25) and r["score_drop"] == pytest.approx(0.45 / 4)
    assert r["mismatched_clip_score"] == pytest.approx(0.1)
    assert am.intervals_overlap([0, 1], [1, 2]) and not am.intervals_overlap([0, 0.9], [1, 2])


# ---- bad input: one clear line, before any model loads ---------------------------------------------
def test_vocabulary_files(tmp_path):
    assert len(load_vocabulary(None)) > 100
    (tmp_path / "v.csv").write_text("ngram,count\nsale,9\nopen,5\nsale,2\ncafé,1\n")
    assert load_vocabulary(tmp_path / "v.csv") == ["sale", "open", "café"]
    (tmp_path / "parrot.csv").write_text("word,frequency\nstop,12\nexit,3\n")  # another header
    assert load_vocabulary(tmp_path / "parrot.csv") == ["stop", "exit"]
    (tmp_path / "vocab").mkdir()
    shutil.copy(tmp_path / "v.csv", tmp_path / "vocab" / "co_emb_1gram.csv")
    assert load_vocabulary(tmp_path, top=2) == ["sale", "open"]  # a pool: its vocab/ folder
    (tmp_path / "bad.txt").write_text("hello\n北京\nworld\n  \n")
    with pytest.raises(ValueError, match=r"2 empty or non-Latin words \(line 2: '北京', line 4: '  '\)"):
        load_vocabulary(tmp_path / "bad.txt")
    (tmp_path / "empty.csv").write_text("ngram,count\n,3\nfoo,1\n")
    with pytest.raises(ValueError, match="empty or non-Latin"):
        load_vocabulary(tmp_path / "empty.csv")
    (tmp_path / "one.txt").write_text("solo\n")
    with pytest.raises(ValueError, match="at least 2"):
        load_vocabulary(tmp_path / "one.txt")


def test_bad_checkpoints_and_names(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "name": "unparrot-rn-tiny"}, tmp_path / "ok.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        resolve_models(AuditConfig(models=[str(tmp_path / "list.pt")]))
    with pytest.raises(ValueError, match="not a loadable torch checkpoint"):
        resolve_models(AuditConfig(models=[str(tmp_path / "text.pt")]))
    with pytest.raises(KeyError, match="unknown model 'ViT-Nope'"):
        resolve_models(AuditConfig(models=["ViT-Nope"]))
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_models(AuditConfig(models=[str(tmp_path / "missing.pt")]))
    torch.save({"w": torch.zeros(2)}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="pass --model"):
        resolve_models(AuditConfig(models=[str(tmp_path / "bare.pt")]))
    specs = resolve_models(AuditConfig(models=[str(tmp_path / "ok.pt"), "unparrot-rn-tiny", str(tmp_path / "ok.pt")]))
    assert [(s.name, s.arch) for s in specs] == [
        ("ok", "unparrot-rn-tiny"),
        ("unparrot-rn-tiny-random", "unparrot-rn-tiny"),
        ("ok-2", "unparrot-rn-tiny"),
    ]


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from helpers import write_tar

    torch.save([1, 2], tmp_path / "list.pt")
    (tmp_path / "bad.txt").write_text("a\n\u0416\n")
    nocls = tmp_path / "nocls"
    write_tar(nocls / "test" / "0.tar", [("k.png", b"x"), ("k.cls", b"0")])  # shards without classnames.txt
    cases = [
        ([str(tmp_path / "list.pt")], "not a state dict"),
        (["ViT-Nope"], "unknown model"),
        (["unparrot-rn-tiny", "--vocab", str(tmp_path / "bad.txt")], "non-Latin"),
        (["unparrot-rn-tiny", "--labelled", str(nocls)], "no class names"),
        (["unparrot-rn-tiny", "--attack-target", "nope"], "attack_target"),
    ]
    for args, msg in cases:
        assert main(["audit", *args, "--out", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_confused_targets(tmp_path):
    """ImageNet-Attr's recipe: the wrong class is the one the audited model confuses most with the truth."""
    s = audit(
        AuditConfig(
            models=["unparrot-rn-tiny"],
            out=str(tmp_path),
            vocab_top=6,
            renders=1,
            builtin_per_class=2,
            bootstrap=50,
            attack_target="confused",
            progress=False,
        )
    )
    recs = json.loads(open(s[0]["json"]).read())
    attack = recs[1]["metrics"]
    assert attack["attack_target"] == "confused" and attack["n_images"] == 20 and recs[0]["metrics"]["n_renders"] == 6


# ---- the card end to end (random weights) ----------------------------------------------------------
@pytest.fixture(scope="module")
def cards(synth_pool, tmp_path_factory):
    """Two random-weight tiny models audited with a pool (text reliance), through the CLI."""
    from unparrot.profile import profile

    root = tmp_path_factory.mktemp("audit")
    pool = shutil.copytree(synth_pool, root / "pool")
    profile(pool, backend="oracle", workers=1, progress=False)
    torch.manual_seed(1)
    from unparrot.models import load_clip

    torch.save({"state_dict": load_clip("unparrot-rn-tiny").model.state_dict()}, root / "other.pt")
    args = [
        "audit",
        "unparrot-rn-tiny",
        str(root / "other.pt"),
        "--model",
        "unparrot-rn-tiny",
        "--out",
        str(root / "cards"),
        "--pool",
        str(pool),
        "--pool-samples",
        "40",
        "--vocab-top",
        "30",
        "--builtin-per-class",
        "4",
        "--bootstrap",
        "200",
        "--font-scale",
        "0.4",
        "--quiet",
    ]
    assert main(args) == 0
    return root / "cards"


def test_card_json_is_clip_benchmark_shaped_and_tabulated(cards):
    recs = json.loads((cards / "other" / "card.json").read_text())
    assert [r["task"] for r in recs] == ["sync", "typographic_attack", "word_reading", "text_reliance"]
    for r in recs:
        assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(r)
    sync, attack, reading, rel = (r["metrics"] for r in recs)
    assert sync["n_words"] == 30 and sync["n_renders"] == 120 and sync["n_derangements"] == 5
    assert attack["n_images"] == 40 and attack["chance"] == pytest.approx(0.1)
    assert rel["n_pairs"] == 40 and 0 < rel["share_with_text_pool"] < 1
    for m, k in ((sync, "sync_gap"), (attack, "attack_success_rate"), (reading, "read_top1"), (rel, "carried_share")):
        lo, hi = m[f"{k}_ci95"]
        assert lo <= m[k] <= hi
    assert recs[0]["timing"]["images"] == 120 + 3 * 40 + 2 * 40
    assert len(read_results(cards)) == 8
    table = results_table(cards)
    assert "| other |" in table and "| unparrot-rn-tiny-random |" in table
    assert "audit attack success" in table and "read top1" in table and "text-carried share" in table
    html = (cards / "comparison.html").read_text()
    assert "other/card.html" in html and "unparrot-rn-tiny-random/card.html" in html


def test_card_is_reproducible(cards, tmp_path):
    """The same model and seed give the same card, numbers and intervals; drawing images in 2 threads
    changes nothing."""
    cfg = dict(
        models=["unparrot-rn-tiny"],
        out=str(tmp_path),
        vocab_top=30,
        builtin_per_class=4,
        bootstrap=200,
        font_scale=0.4,
        workers=2,
        progress=False,
    )
    audit(AuditConfig(**cfg))
    a = json.loads((tmp_path / "unparrot-rn-tiny-random" / "card.json").read_text())
    b = json.loads((cards / "unparrot-rn-tiny-random" / "card.json").read_text())
    assert [r["metrics"] for r in a[:3]] == [r["metrics"] for r in b[:3]]  # the first card also had a pool


@pytest.mark.browser
def test_card_and_comparison_render_in_chromium(cards, tmp_path):
    from helpers import open_in_chromium

    html = (cards / "other" / "card.html").read_text()
    assert "http://" not in html and "https://" not in html and "0.317" in html and "0.368" in html
    problems, images, headings = open_in_chromium(cards / "other" / "card.html", tmp_path / "card.png")
    assert problems == []
    assert {"Summary", "Sync score", "Word reading", "Typographic attack", "Text reliance on the pool"} <= set(headings)
    assert any(h.startswith("Attacks that flipped") for h in headings)
    assert len(images) >= 20 and all(ok and w > 0 for ok, w in images)
    assert (tmp_path / "card.png").stat().st_size > 20000
    problems, images, headings = open_in_chromium(cards / "comparison.html", tmp_path / "comparison.png")
    assert problems == [] and "Models compared" in headings and len(images) >= 6 and all(ok for ok, _ in images)


# ---- validity: a reader and a non-reader trained here -----------------------------------------------
READER_STEPS = 400
APART = ("Sync gap",)  # measured apart at this size (docs/audit.md); the others: direction only


@pytest.mark.slow
@pytest.mark.timeout(3600)  # two trainings: about 2 minutes each on a quiet 2-core machine, 15 on a loaded one
def test_card_separates_a_reader_from_a_non_reader(tmp_path):
    """Two tiny models trained for the same steps: one on text-free shape images, one on parrot-heavy data
    (80% images that are only a written word of the audit's vocabulary, 70% of them class names, captioned
    by the word; 20% shapes). The reader must score above the non-reader on the Sync gap, attack success and
    word reading. The models are too small for every interval to separate: the test asserts non-overlap
    where it was measured (APART, see docs/audit.md) and the direction elsewhere."""
    from pathlib import Path

    from unparrot.synth.generate import synth
    from unparrot.synth.world import make_config
    from unparrot.train import TrainConfig
    from unparrot.train.launch import launch_all

    words = list(make_config("learnable").classes) + list(make_config("learnable", vocab_size=30).words())
    (tmp_path / "words.txt").write_text("\n".join(words) + "\n")
    common = dict(n=2000, preset="learnable", eval_sets=(), shard_size=500, progress=False, p_text=0.0)
    synth(tmp_path / "see", seed=0, p_pure_parrot=0.0, **common)
    synth(tmp_path / "read", seed=1, p_pure_parrot=0.8, p_class_word=0.7, vocab_size=30, **common)
    root = Path(__file__).parent.parent
    env = {"PYTHONPATH": str(root / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    configs = {
        name: TrainConfig(
            train_data=str(tmp_path / name),
            out=str(tmp_path / f"run-{name}"),
            samples=READER_STEPS * 64,
            batch_size=64,
            threads=1,
            loader_workers=0,
            init_logit_scale=33.3,
            vocab_texts=[str(tmp_path / "words.txt")],
            progress=False,
        )
        for name in ("see", "read")
    }
    launch_all(configs, workers=2, logs=tmp_path / "logs", env=env)  # a process each, in parallel
    summaries = audit(
        AuditConfig(
            models=[str(tmp_path / f"run-{n}" / "checkpoints" / "final.pt") for n in ("see", "read")],
            out=str(tmp_path / "cards"),
            vocab=str(tmp_path / "words.txt"),
            font_scale=0.4,
            attack_size=0.45,
            fonts=["DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf"],
            builtin_per_class=30,
            progress=False,
        )
    )
    assert [s["model"] for s in summaries] == ["run-see", "run-read"]
    see, read = (s["numbers"] for s in summaries)
    print({k: (see[k], read[k]) for k in see})
    assert see["clean acc1"][1][0] > 0.1, see  # the non-reader sees: above chance (0.1)
    for k in ("Sync gap", "attack success", "word reading top-1"):
        assert read[k][0] > see[k][0], (k, read[k], see[k])
    for k in APART:
        assert read[k][1][0] > see[k][1][1], (k, read[k], see[k])  # the intervals do not overlap
