import io
import json

import numpy as np
import pytest
from PIL import Image

from unparrot.pool import Pool
from unparrot.synth.generate import synth
from unparrot.synth.stats import truth_stats
from unparrot.synth.world import EVAL_SETS, make_config, make_pool_sample


def test_deterministic_for_a_seed(tmp_path):
    a = synth(tmp_path / "a", n=60, preset="learnable", seed=1, shard_size=25, eval_per_class=2, progress=False)
    b = synth(tmp_path / "b", n=60, preset="learnable", seed=1, shard_size=25, eval_per_class=2, progress=False)
    ra = [(r["uid"], r["caption"], r["image"]) for r in Pool(tmp_path / "a").samples()]
    rb = [(r["uid"], r["caption"], r["image"]) for r in Pool(tmp_path / "b").samples()]
    assert ra == rb
    assert a["kinds"] == b["kinds"] and a["shards"] == 3
    synth(tmp_path / "c", n=60, preset="learnable", seed=2, shard_size=25, eval_per_class=2, progress=False)
    assert [r["caption"] for r in Pool(tmp_path / "c").samples()] != [r[1] for r in ra]
    assert (
        synth(tmp_path / "a", n=60, preset="learnable", seed=1, shard_size=25, eval_per_class=2, progress=False) == a
    )  # rerun: already there
    with pytest.raises(FileExistsError):
        synth(tmp_path / "a", n=61, preset="learnable", seed=1, progress=False)


def test_other_eval_settings_remake_only_the_eval_sets(tmp_path):
    kw = dict(n=30, preset="learnable", seed=1, shard_size=30, eval_per_class=2, progress=False)
    a = synth(tmp_path, eval_sets=("clean", "attack"), **kw)
    shard = next((tmp_path / "shards").glob("*.tar"))
    before, t_before = shard.read_bytes(), shard.stat().st_mtime_ns
    att = (tmp_path / "eval" / "attack" / "test" / "0.tar").read_bytes()
    b = synth(tmp_path, eval_sets=("clean", "attack"), attack_size=0.45, **kw)
    assert shard.read_bytes() == before and shard.stat().st_mtime_ns == t_before  # the pool is kept
    assert (tmp_path / "eval" / "attack" / "test" / "0.tar").read_bytes() != att  # bigger attack words
    assert b["request"]["attack_size"] == 0.45 and b["kinds"] == a["kinds"]
    assert synth(tmp_path, eval_sets=("clean", "attack"), attack_size=0.45, **kw) == b


@pytest.mark.parametrize("preset", ["laion", "learnable"])
def test_presets_statistics(preset, tmp_path):
    synth(tmp_path / "p", n=600, preset=preset, seed=0, shard_size=300, eval_sets=(), progress=False)
    s = truth_stats(tmp_path / "p")
    assert 0.42 <= s["share_with_text"] <= 0.58  # LAION: about half the images carry text
    assert 0.2 <= s["mean_cotr"] <= 0.45  # about 30% of caption words parroted on average
    assert s["share_parrot_of_text_images"] >= 0.85  # ~90% of text-image captions overlap the text


def test_learnable_preset_matches_feasibility_recipe():
    cfg = make_config("learnable")
    assert cfg.image_size == 64 and cfg.object_scale == (0.24, 0.40) and cfg.rotation == 20
    assert cfg.p_text == 0.25 and cfg.p_pure_parrot == 0.25 and cfg.p_caption_parrots == 0.9
    assert max(len(w) for w in cfg.words()) <= 5
    assert 110 <= len(cfg.words()) + len(cfg.classes) <= 140
    rng = np.random.default_rng(0)
    texts = [t["text"] for _ in range(400) for t in make_pool_sample(cfg, rng)[2]["texts"]]
    share_class = np.mean([t in cfg.classes for t in texts])
    assert 0.4 <= share_class <= 0.6


def test_ground_truth_is_recorded(synth_pool):
    for r in list(Pool(synth_pool).samples())[:50]:
        gt = r["meta"]["synth"]
        assert gt["kind"] in ("object", "text", "parrot")
        if gt["kind"] == "object":
            assert gt["texts"] == [] and 0 <= gt["label"] < 10
        else:
            assert gt["texts"] and all(len(t["quad"]) == 4 for t in gt["texts"])
        for w in gt["parroted"]:
            assert w in r["caption"]


def test_eval_sets_in_clip_benchmark_layout(synth_pool):
    import webdataset as wds

    for name in EVAL_SETS:
        d = synth_pool / "eval" / name
        assert (d / "classnames.txt").read_text().split() == list(make_config("learnable").classes)
        assert "{c}" in (d / "zeroshot_classification_templates.txt").read_text()
        samples = list(wds.WebDataset(str(d / "test" / "0.tar"), shardshuffle=False))
        assert len(samples) == 40 and all("cls" in s and "png" in s for s in samples)
    clean = list(wds.WebDataset(str(synth_pool / "eval" / "clean" / "test" / "0.tar"), shardshuffle=False))
    attack = list(wds.WebDataset(str(synth_pool / "eval" / "attack" / "test" / "0.tar"), shardshuffle=False))
    for c, a in zip(clean[:10], attack[:10]):
        info = json.loads(a["json"])
        assert info["attack_label"] != info["label"]
        ca = np.asarray(Image.open(io.BytesIO(c["png"]))).astype(int)
        aa = np.asarray(Image.open(io.BytesIO(a["png"]))).astype(int)
        diff = np.abs(ca - aa).sum(-1) > 0
        assert 0.02 < diff.mean() < 0.5  # the same scene, with a word written on it


def test_bad_parameters_are_clear():
    with pytest.raises(ValueError, match="p_text"):
        make_config("laion", p_text=1.5)
    with pytest.raises(TypeError, match="unknown synth parameters"):
        make_config("laion", colour="red")
    with pytest.raises(KeyError, match="preset"):
        make_config("nope")


def test_world_parameters_for_the_er_design(tmp_path):
    """narrow (few backgrounds), diverse (outline style + shift backgrounds) and class-name captions; the
    default world's digest (its uids) does not change with the new parameters at their defaults."""
    import dataclasses
    import hashlib

    from unparrot.synth.world import config_digest

    cfg = make_config("learnable")
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("backgrounds", "p_outline", "caption_mode")}
    blob = json.dumps({"cfg": old, "seed": 3}, sort_keys=True, default=list)
    assert config_digest(cfg, 3) == hashlib.sha256(blob.encode()).hexdigest()[:12]
    rng = np.random.default_rng(0)
    narrow = make_config("learnable", backgrounds=["plain", "stripes"])
    assert {make_pool_sample(narrow, rng)[2]["background"] for _ in range(80)} <= {"plain", "stripes"}
    diverse = make_config("learnable", backgrounds=["plain", "noise", "waves"], p_outline=0.5)
    gts = [make_pool_sample(diverse, rng)[2] for _ in range(120)]
    objs = [g for g in gts if g["kind"] != "parrot"]
    assert 0.3 < np.mean([g["style"] == "outline" for g in objs]) < 0.7
    assert {g["background"] for g in objs} >= {"noise", "waves"}
    named = make_config("learnable", caption_mode="classname")
    for _ in range(60):
        _, cap, gt = make_pool_sample(named, rng)
        if gt["kind"] != "parrot":
            assert cap == gt["class"] and gt["parroted"] == []
    with pytest.raises(ValueError, match="backgrounds"):
        make_config("learnable", backgrounds=["lava"])
    with pytest.raises(ValueError, match="caption_mode"):
        make_config("learnable", caption_mode="labels")
    synth(
        tmp_path,
        n=40,
        preset="learnable",
        seed=0,
        shard_size=40,
        eval_per_class=1,
        eval_sets=(),
        progress=False,
        backgrounds=["plain", "stripes"],
        p_outline=0.5,
    )
    from unparrot.synth.stats import format_truth_stats

    text = format_truth_stats(truth_stats(tmp_path))
    assert "p_outline=0.5" in text and "outline" in text.split("styles")[1]
