import json

import numpy as np
import pytest
from PIL import Image

from helpers import assert_close_scaled

from unparrot.evaluate.attack import confused_classes
from unparrot.evaluate.datasets import load_set, write_set
from unparrot.evaluate.metrics import (
    attack_success_rate,
    confusion_matrix,
    effective_robustness,
    fit_trend,
    mean_per_class_recall,
    retrieval_recall,
    topk_accuracy,
)
from unparrot.evaluate.results import read_results, results_table, write_result
from unparrot.evaluate.robustness import robustness
from unparrot.evaluate.sync import derangement, render_word


def test_topk_and_recall_hand_computed():
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [0.4, 0.35, 0.25]])
    labels = np.array([0, 1, 1, 2])
    m = topk_accuracy(logits, labels, (1, 2, 5))
    assert m["acc1"] == 0.5 and m["acc2"] == 0.75 and m["acc5"] == 1.0
    preds = logits.argmax(1)  # [0, 2, 1, 0]
    # class 0: 1/1, class 1: 1/2, class 2: 0/1 -> mean 0.5
    assert mean_per_class_recall(preds, labels, 3) == pytest.approx(0.5)
    assert attack_success_rate(preds, np.array([0, 2, -1, 1])) == pytest.approx(2 / 3)
    cm = confusion_matrix(preds, labels, 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 0]]


def test_retrieval_hand_computed():
    img = np.eye(3)
    # texts 0,1 belong to image 0; text 2 to image 1; text 3 to image 2 (but it points at image 1)
    txt = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.8, 0.6]])
    m = retrieval_recall(img, txt, np.array([0, 0, 1, 2]), ks=(1, 2))
    assert m["image_retrieval_recall@1"] == 0.75 and m["image_retrieval_recall@2"] == 1.0
    # image 0 -> text 0 first (hit); image 1 -> text 2 (hit); image 2 -> text 3 (hit)
    assert m["text_retrieval_recall@1"] == 1.0


def test_effective_robustness_hand_computed():
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    lg = lambda p: np.log(p / (1 - p))  # noqa: E731
    acc_id = np.array([0.5, 0.6, 0.7, 0.8])
    acc_ood = sig(0.5 * lg(acc_id) - 0.4)  # baselines exactly on a logit-linear trend
    a, b = fit_trend(acc_id, acc_ood)
    assert a == pytest.approx(0.5) and b == pytest.approx(-0.4)
    assert effective_robustness(0.6, sig(0.5 * lg(0.6) - 0.4), a, b) == pytest.approx(0.0, abs=1e-9)
    assert effective_robustness(0.6, sig(0.5 * lg(0.6) - 0.4) + 0.05, a, b) == pytest.approx(0.05)
    pa, pb = fit_trend(acc_id, acc_ood, link="probit")
    assert pa > 0
    with pytest.raises(ValueError):
        fit_trend([0.5], [0.4])


def test_robustness_across_result_files(tmp_path):
    accs = {"m1": (0.5, 0.30, 0.2), "m2": (0.6, 0.38, 0.3), "m3": (0.7, 0.47, 0.4), "new": (0.6, 0.50, 0.4)}
    for m, (i, o1, o2) in accs.items():
        for d, v in (("clean", i), ("shift-a", o1), ("shift-b", o2)):
            write_result(tmp_path, m, "zeroshot", d, {"acc1": v})
    r = robustness(tmp_path, ["clean"], ["shift-a", "shift-b"], baselines=["m1", "m2", "m3"], plot=tmp_path / "er.png")
    er = r["effective_robustness"]
    assert list(er) == ["new"] and er["new"]["clean->shift-a"] > 0.09  # baselines are not scored by default
    r = robustness(tmp_path, ["clean"], ["shift-a", "shift-b"], baselines=["m1", "m2", "m3"], score_baselines=True)
    assert abs(r["effective_robustness"]["m2"]["mean"]) < 0.02
    assert (tmp_path / "er.png").stat().st_size > 5000
    assert any(x["task"] == "robustness" for x in read_results(tmp_path))
    table = results_table(tmp_path)
    assert "| new |" in table and "ER mean" in table
    assert results_table(tmp_path, format="csv").splitlines()[0].startswith("model,")
    with pytest.raises(KeyError, match="missing"):
        robustness(tmp_path, ["clean"], ["shift-c"], baselines=["m1", "m2"])


def test_robustness_refuses_to_score_a_baseline_unless_asked(tmp_path):
    """Fang et al.'s ER is measured against a separate family: a line fitted through the scored models
    themselves gives them ER ~0 by construction."""
    for m, (i, o) in {"b1": (0.5, 0.3), "b2": (0.7, 0.5), "t": (0.6, 0.6)}.items():
        for d, v in (("clean", i), ("shift", o)):
            write_result(tmp_path, m, "zeroshot", d, {"acc1": v})
    with pytest.raises(ValueError, match="baseline family"):
        robustness(tmp_path, ["clean"], ["shift"])  # no family given
    with pytest.raises(ValueError, match=r"\['b1'\] are also baselines"):
        robustness(tmp_path, ["clean"], ["shift"], baselines=["b1", "b2"], models=["b1", "t"])
    ok = robustness(tmp_path, ["clean"], ["shift"], baselines=["b1", "b2"], models=["b1", "t"], score_baselines=True)
    assert ok["effective_robustness"]["b1"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert ok["effective_robustness"]["t"]["mean"] > 0.15
    in_sample = robustness(tmp_path, ["clean"], ["shift"], score_baselines=True)
    assert set(in_sample["baselines"]) == {"b1", "b2", "t"}


def test_result_files_have_clip_benchmark_shape(tmp_path):
    p = write_result(tmp_path, "my/model", "zeroshot", "clean", {"acc1": 0.5}, pretrained="x.pt")
    rec = json.loads(p.read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(rec)
    assert p.parent.name == "my_model"


def test_confused_classes_with_fallback():
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([0, 2, 2, 0, 1, 2])  # class 0 -> 2, class 1 -> 0, class 2 never confused
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1]], float)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert confused_classes(labels, preds, emb).tolist() == [2, 0, 1]  # 2 falls back to its nearest text


def test_sync_rendering_and_derangement():
    im = render_word("parrot", "white_on_black", 224, 32)
    arr = np.asarray(im)
    ys, xs = np.nonzero(arr[..., 0] > 128)
    assert abs((xs.min() + xs.max()) / 2 - 112) < 3 and abs((ys.min() + ys.max()) / 2 - 112) < 3  # centred
    assert 20 <= ys.max() - ys.min() <= 34  # a 32 px font
    p = derangement(10, seed=3)
    assert sorted(p) == list(range(10)) and not (p == np.arange(10)).any()


def _tiny_set(tmp_path):
    rows = []
    for c in range(3):
        for j in range(4):
            im = Image.new("RGB", (32, 32), [(200, 0, 0), (0, 200, 0), (0, 0, 200)][c])
            rows.append({"key": f"k{c}_{j}", "image": im, "label": c, "meta": {"captions": [f"color {c}"]}})
    write_set(tmp_path / "set", rows, ["red", "green", "blue"], ["a {c} square"])
    return tmp_path / "set"


def test_sets_wds_and_folder(tmp_path):
    ds = load_set(_tiny_set(tmp_path))
    rows = list(ds.samples())
    assert len(rows) == 12 and ds.classnames == ["red", "green", "blue"] and rows[0]["captions"] == ["color 0"]
    folder = tmp_path / "folder"
    for name in ("cat_face", "dog"):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / name / "a.jpg")
    f = load_set(folder, templates="openai")
    assert f.classnames == ["cat face", "dog"] and len(f.templates) == 80 and f.kind == "folder"
    assert [r["label"] for r in f.samples()] == [0, 1]
    with pytest.raises(FileNotFoundError):
        load_set(tmp_path / "nope")


def test_evaluate_end_to_end_on_a_tiny_set(tmp_path):
    import torch

    from unparrot.evaluate import evaluate
    from unparrot.evaluate.attack import build_attack
    from unparrot.models import load_clip

    path = _tiny_set(tmp_path)
    torch.manual_seed(0)
    ck = tmp_path / "m.pt"
    torch.save({"state_dict": load_clip("unparrot-rn-tiny").model.state_dict()}, ck)
    recs = evaluate(
        "unparrot-rn-tiny",
        str(ck),
        datasets={"tiny": str(path)},
        tasks=("zeroshot", "retrieval", "sync"),
        out=tmp_path / "res",
        name="rand",
        sync_words=["red", "green", "blue"],
        progress=False,
    )
    assert {r["task"] for r in recs} == {"zeroshot", "retrieval", "sync"}
    z = next(r for r in recs if r["task"] == "zeroshot")["metrics"]
    assert z["n"] == 12 and 0 <= z["acc1"] <= 1
    s = next(r for r in recs if r["task"] == "sync")["metrics"]
    assert set(s["per_style"]) == {"black_on_white", "white_on_black", "white_on_gray", "black_on_gray"}
    again = evaluate(
        "unparrot-rn-tiny", str(ck), datasets={"tiny": str(path)}, out=tmp_path / "res", name="rand", progress=False
    )
    assert again[0]["metrics"]["seconds"] == z["seconds"]  # read back, not recomputed
    assert again[0]["inputs"] == next(r for r in recs if r["task"] == "zeroshot")["inputs"]
    # a retrained checkpoint (another file state) is evaluated again, not read back
    torch.manual_seed(1)
    torch.save({"state_dict": load_clip("unparrot-rn-tiny").model.state_dict()}, ck)
    fresh = evaluate(
        "unparrot-rn-tiny", str(ck), datasets={"tiny": str(path)}, out=tmp_path / "res", name="rand", progress=False
    )
    assert fresh[0]["inputs"] != again[0]["inputs"]
    (tmp_path / "res" / "rand" / "zeroshot__tiny.json").write_text(
        (tmp_path / "res" / "rand" / "zeroshot__tiny.json").read_text().replace('"acc1"', '"acc1_marker"', 1)
    )
    same = evaluate(
        "unparrot-rn-tiny", str(ck), datasets={"tiny": str(path)}, out=tmp_path / "res", name="rand", progress=False
    )
    assert "acc1_marker" in same[0]["metrics"]  # unchanged inputs: read back
    out = build_attack(path, tmp_path / "att", mode="attr", model="unparrot-rn-tiny", pretrained=str(ck))
    assert out["images"] == 12 and set(out["targets"]) == {"red", "green", "blue"}
    att = list(load_set(tmp_path / "att").samples())
    assert all(r["meta"]["attack_label"] != r["label"] for r in att)
    zr = evaluate(
        "unparrot-rn-tiny",
        str(ck),
        datasets={"att": str(tmp_path / "att")},
        out=tmp_path / "res",
        name="rand",
        progress=False,
    )[0]["metrics"]
    assert "attack_success_rate" in zr
    rnd = build_attack(path, tmp_path / "att2", mode="random", seed=1)
    assert rnd["images"] == 12
    with pytest.raises(ValueError, match="reference model"):
        build_attack(path, tmp_path / "att3", mode="attr")


def test_retrieval_on_any_captioned_shards(synth_pool):
    """A pool (shards/*.tar with .txt captions, no class names) is a retrieval set; zero-shot needs names."""
    from unparrot.evaluate.zeroshot import retrieval, zeroshot
    from unparrot.models import load_clip

    ds = load_set(synth_pool)
    assert ds.classnames == [] and len(ds.tars) == 3
    clip = load_clip("unparrot-rn-tiny")
    m = retrieval(clip, ds)
    assert m["n_images"] == 300 and m["n_texts"] == 300
    for k in (1, 5, 10):
        assert 0.0 <= m[f"image_retrieval_recall@{k}"] <= 1.0 and 0.0 <= m[f"text_retrieval_recall@{k}"] <= 1.0
    assert m["image_retrieval_recall@1"] <= m["image_retrieval_recall@10"]
    with pytest.raises(ValueError, match="class names"):
        zeroshot(clip, ds)


def test_sync_score_and_class_embeddings_hand_computed(monkeypatch):
    """The arithmetic on known embeddings (a test double stands in for the encoders)."""
    from types import SimpleNamespace

    from unparrot.evaluate import sync, zeroshot

    T = np.eye(3)  # 3 words, orthogonal text embeddings
    # the rendered word i is seen as: word 0 perfectly, word 1 half-read, word 2 read as word 0
    s = np.sqrt(0.5)
    I = np.array([[1.0, 0, 0], [0, s, s], [1.0, 0, 0]])
    monkeypatch.setattr(sync, "encode_texts", lambda clip, texts: T[: len(texts)])
    monkeypatch.setattr(sync, "encode_images", lambda clip, ims, batch=64: (I, np.ones(3, bool)))
    clip = SimpleNamespace(image_size=64)
    r = sync.sync_score(clip, ["a", "b", "c"], styles=("black_on_white",))
    matched = np.array([1.0, s, 0.0])
    perm = sync.derangement(3, 0)
    mismatched = (I * T[perm]).sum(1)
    assert r["sync_mean"] == pytest.approx(matched.mean()) and r["sync_std"] == pytest.approx(matched.std())
    assert r["sync_gap"] == pytest.approx(matched.mean() - mismatched.mean())
    assert r["read_top1"] == pytest.approx(2 / 3)  # word 2 is read as word 0
    assert r["font_px"] == round(32 / 224 * 64)

    E = {"a photo of a x": [1.0, 0], "x": [0.0, 1], "a photo of a y": [0.6, 0.8], "y": [0.6, 0.8]}
    monkeypatch.setattr(zeroshot, "encode_texts", lambda clip, texts: np.array([E[t] for t in texts]))
    W = zeroshot.class_embeddings(clip, ["x", "y"], ["a photo of a {c}", "{c}"])
    np.testing.assert_allclose(W[0], np.array([1, 1]) / np.sqrt(2))  # mean of the templates, re-normalised
    np.testing.assert_allclose(W[1], [0.6, 0.8])


def test_text_features_over_the_used_length_equal_open_clips(monkeypatch):
    """encode_text cuts the padding after the last used token (a causal tower pooled at end-of-text does
    not look at it): features equal open_clip's own encode_text, for open_clip's ViT-B-32 (77 positions)
    and unparrot's tiny model; a tower pooled elsewhere ('last') runs uncut, where a cut would change it."""
    import torch

    from unparrot.models import build_vocab, encode_text, load_clip

    texts = ["a photo of a cat.", "stop", "a rather long caption of a dog on a red mat " * 2, "x"]
    for name, extra in (("ViT-B-32", {}), ("unparrot-rn-tiny-v1k", {"vocab": build_vocab(texts)})):
        torch.manual_seed(0)
        clip = load_clip(name, None, device="cpu", **extra)
        model, tok = clip.model.eval(), clip.tokenizer(texts)
        assert int((tok != 0).sum(1).max()) < tok.shape[1]  # there is padding to cut
        with torch.inference_mode():
            assert_close_scaled(encode_text(model, tok).numpy(), model.encode_text(tok).numpy(), rel=1e-5)
            monkeypatch.setattr(model, "text_pool_type", "last")
            assert torch.equal(encode_text(model, tok), model.encode_text(tok))
