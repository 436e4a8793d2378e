import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import KILLED, assert_close_scaled, count_renames, kill_points, run_killed
from unparrot.curate.reshard import reshard
from unparrot.pool import Pool, write_subset
from unparrot.train import TrainConfig, train
from unparrot.train.data import SampleMaker, TrainStream, resolve_shards

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def shards(synth_pool, tmp_path_factory):
    """The synthetic pool written by reshard (the path every training run takes), with rewrites."""
    pool = Pool(synth_pool)
    out = tmp_path_factory.mktemp("train") / "all"
    write_subset(out.parent / "all.npy", [r["uid"] for r in pool.samples()])
    reshard(pool, out.parent / "all.npy", out, shard_size=75, progress=False)
    return out


def _cfg(shards, out, **kw):
    base = dict(
        train_data=str(shards),
        out=str(out),
        model="unparrot-vit-tiny",
        samples=16 * 12,
        batch_size=16,
        loader_workers=0,
        threads=1,
        lr=1e-3,
        warmup=2,
        shuffle_buffer=50,
        progress=False,
        log_every=1,
        seed=1,
    )
    base.update(kw)
    return TrainConfig.from_dict(base)


def _losses(run):
    return [json.loads(ln)["loss"] for ln in open(Path(run) / "metrics.jsonl")]


def test_train_and_load_with_open_clip(shards, tmp_path):
    s = train(_cfg(shards, tmp_path / "r", model="unparrot-rn-tiny-v1k", samples=16 * 6, init_logit_scale=33.3))
    assert s["steps"] == 6 and s["samples_seen"] == 96 and np.isfinite(s["loss"])
    ck = torch.load(s["checkpoint"], weights_only=True)
    assert ck["name"] == "unparrot-rn-tiny-v1k" and ck["step"] == 6 and len(ck["unparrot_vocab"]) > 20
    import open_clip

    from unparrot.models import register_configs

    register_configs()
    model, _, _ = open_clip.create_model_and_transforms("unparrot-rn-tiny-v1k", pretrained=s["checkpoint"])
    assert all(torch.equal(v, ck["state_dict"][k]) for k, v in model.state_dict().items())
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[-1])["samples_seen"] == 96
    assert list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_is_exact(shards, tmp_path):
    full = train(_cfg(shards, tmp_path / "full"))
    part = train(_cfg(shards, tmp_path / "part", stop_at_step=5, checkpoint_every=5))
    assert part["steps"] == 5
    resumed = train(_cfg(shards, tmp_path / "part", resume="latest"))
    assert resumed["steps"] == 12
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert len(a) == len(b) == 12
    assert_close_scaled(a, b, 1e-5, "losses")
    wa = torch.load(full["checkpoint"], weights_only=True)["state_dict"]
    wb = torch.load(resumed["checkpoint"], weights_only=True)["state_dict"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert_close_scaled(wa[k], wb[k], 1e-5, k)


def test_resuming_a_finished_run_changes_nothing(shards, tmp_path):
    """Regression: `--resume latest` on a finished run failed with `samples_seen`, rewrote final.pt at one
    step past the end and summary.json with loss NaN. Also after a kill between final.pt and summary.json."""
    done = train(_cfg(shards, tmp_path / "r", samples=16 * 3))
    run = tmp_path / "r"
    files = {p: p.read_bytes() for p in [run / "summary.json", run / "metrics.jsonl", *run.glob("checkpoints/*.pt")]}
    again = train(_cfg(shards, run, samples=16 * 3, resume="latest"))
    assert again == done
    assert {p: p.read_bytes() for p in files} == files
    (run / "summary.json").unlink()  # killed after the final checkpoint, before its summary
    rebuilt = train(_cfg(shards, run, samples=16 * 3, resume="latest"))
    assert rebuilt["steps"] == 3 and rebuilt["loss"] == done["loss"] and rebuilt["samples_seen"] == 48
    assert rebuilt["checkpoint"] == done["checkpoint"]
    assert {p: p.read_bytes() for p in files if p.suffix != ".json"} == {
        k: v for k, v in files.items() if k.suffix != ".json"
    }
    assert torch.load(run / "checkpoints" / "final.pt", weights_only=True)["step"] == 3


@pytest.mark.slow
def test_killed_at_random_renames_resumes_to_the_same_run(shards, tmp_path):
    """Crash-resume: train killed just before its n-th rename (a checkpoint, the `latest` link or the
    summary; n seeded), then `--resume latest` until done, equals an uninterrupted run: the loss curve and
    the final weights (same machine: a tolerance scaled to each tensor, see helpers.assert_close_scaled)."""
    kw = dict(samples=16 * 4, checkpoint_every=1)
    full = train(_cfg(shards, tmp_path / "full", **kw))
    want = torch.load(full["checkpoint"], weights_only=True)["state_dict"]
    total = count_renames(lambda: train(_cfg(shards, tmp_path / "count", **kw)))
    for n in sorted(set(kill_points(total, 3, seed=21)) | {total}):  # the last: before summary.json
        run = tmp_path / f"k{n}"
        assert run_killed(lambda run=run: train(_cfg(shards, run, **kw)), n) == KILLED
        done = train(_cfg(shards, run, resume="latest" if (run / "checkpoints" / "latest.pt").exists() else None, **kw))
        assert done["steps"] == 4 and json.loads((run / "summary.json").read_text())["steps"] == 4
        assert_close_scaled(_losses(tmp_path / "full"), _losses(run), 1e-5, f"losses after a kill at rename {n}")
        got = torch.load(done["checkpoint"], weights_only=True)["state_dict"]
        for k in want:
            assert_close_scaled(want[k], got[k], 1e-5, k)
        assert not list(run.rglob("*.tmp"))


def test_global_order_is_independent_of_layout(shards):
    from unparrot.models import load_clip

    clip = load_clip("unparrot-vit-tiny")
    maker = SampleMaker(clip.image_size, clip.tokenizer, seed=0)
    paths = resolve_shards(str(shards))
    one = list(TrainStream(paths, maker, 8, 4, 0, 0, 1, seed=3, shuffle_buffer=20))
    r0 = list(TrainStream(paths, maker, 8, 4, 0, 0, 2, seed=3, shuffle_buffer=20))
    r1 = list(TrainStream(paths, maker, 8, 4, 0, 1, 2, seed=3, shuffle_buffer=20))
    for (_, x, t), (_, x0, t0), (_, x1, t1) in zip(one, r0, r1):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(t, torch.cat([t0, t1]))
    late = list(TrainStream(paths, maker, 8, 4, 2, 0, 1, seed=3, shuffle_buffer=20))  # resume at step 2
    assert [s for s, _, _ in late] == [2, 3] and torch.equal(late[0][1], one[2][1])


def test_laclip_text_sampling():
    from unparrot.io.tar import RawSample

    maker = SampleMaker(32, lambda t: torch.zeros(1, 4, dtype=torch.long), use_rewrites=True)
    row = {"caption": "a red star", "meta": {"rewrites": ["a crimson star shape", "star", "red star icon"]}}
    picks = [maker.caption(row, np.random.default_rng(i)) for i in range(4000)]
    counts = {c: picks.count(c) for c in set(picks)}
    # "star" has one word: it falls back to the original, which is therefore picked half the time
    assert set(counts) == {"a red star", "a crimson star shape", "red star icon"}
    assert abs(counts["a red star"] / 4000 - 0.5) < 0.03 and abs(counts["red star icon"] / 4000 - 0.25) < 0.03
    assert maker.caption(row, np.random.default_rng(7)) == maker.caption(row, np.random.default_rng(7))
    off = SampleMaker(32, None, use_rewrites=False)
    assert off.caption(row, np.random.default_rng(0)) == "a red star"
    heavy = SampleMaker(32, None, use_rewrites=True, original_weight=3.0)
    p = [heavy.caption(row, np.random.default_rng(i)) for i in range(3000)].count("a red star") / 3000
    assert abs(p - 4 / 6) < 0.03  # weights 3:1:1:1, plus the one-word fallback
    styled = SampleMaker(32, None, use_rewrites=True, original_weight=0.0, rewrite_weights=(3.0, 0.0, 1.0))
    picks = [styled.caption(row, np.random.default_rng(i)) for i in range(3000)]
    assert "star" not in picks and abs(picks.count("a crimson star shape") / 3000 - 0.75) < 0.03
    with pytest.raises(ValueError, match="non-negative"):
        TrainConfig(train_data="x", rewrite_weights=[1, -1]).validate()
    assert isinstance(RawSample("k"), RawSample)


def test_bad_config_is_clear(shards, tmp_path):
    with pytest.raises(ValueError, match="samples"):
        _cfg(shards, tmp_path, samples=3).validate()
    with pytest.raises(TypeError, match="unknown training options"):
        TrainConfig.from_dict({"train_data": "x", "learning_rate": 1})
    with pytest.raises(FileNotFoundError):
        train(_cfg(shards, tmp_path / "x", resume=str(tmp_path / "nope.pt")))


@pytest.mark.slow
def test_ddp_two_processes_match_one_with_resume(shards, tmp_path):
    """`train --nproc 2` (torchrun, gloo on the CPU) follows one process's loss curve at the same global
    batch, also when it is stopped at a checkpoint and resumed with `--resume latest`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    args = [
        str(shards),
        "--model",
        "unparrot-vit-tiny",
        "--samples",
        "96",
        "--batch-size",
        "16",
        "--loader-workers",
        "0",
        "--threads",
        "1",
        "--warmup",
        "2",
        "--shuffle-buffer",
        "50",
        "--seed",
        "1",
        "--quiet",
    ]

    def train_cli(out, *extra):
        p = subprocess.run(
            [sys.executable, "-m", "unparrot", "train", *args, "--out", str(tmp_path / out), *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 0, p.stderr[-3000:]

    train_cli("one")
    train_cli("two", "--nproc", "2", "--stop-at-step", "3", "--checkpoint-every", "3")
    assert len(_losses(tmp_path / "two")) == 3
    train_cli("two", "--nproc", "2", "--resume", "latest")
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert_close_scaled(a, b, 1e-4, "losses")  # two processes: the gradient all-reduce sums in another order
    sa = json.loads((tmp_path / "one" / "summary.json").read_text())
    sb = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert sa["samples_seen"] == sb["samples_seen"] == 96 and sb["world_size"] == 2


@pytest.mark.slow
def test_open_clip_trainer_reads_reshard_output(shards, tmp_path):
    """The real client: open_clip's own trainer on our shards (our config registered, nothing else changed)."""
    from unparrot.train.openclip import open_clip_command

    cmd = open_clip_command(shards, tmp_path, "oc", samples=64, batch_size=16, workers=0, warmup=1, log_every=1)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    log = (tmp_path / "oc" / "out.log").read_text()
    assert "Contrastive_loss" in log and (tmp_path / "oc" / "checkpoints" / "epoch_1.pt").exists()
