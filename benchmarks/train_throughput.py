"""Samples/s of `unparrot train` against open_clip's own trainer (`open_clip_train.main`) on the same shards,
model, batch size and CPU, in the same run (target >= 1.0); and the share of step time spent waiting for
data (target < 10%). Both: unparrot-rn-tiny (open_clip's trainer gets the config registered), batch 64,
one data-loader worker, torch's default threads; steady state = steps after the first 10.

Run: .venv/bin/python benchmarks/train_throughput.py [--steps 80]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np

from _util import OUT, report, synthetic_pool

from unparrot.train import TrainConfig
from unparrot.train.launch import launch


def shards_dir():
    from unparrot.curate.reshard import reshard
    from unparrot.pool import Pool, write_subset

    pool = synthetic_pool("train-src-10000", 10000, shard_size=2000)
    out = OUT / "train-shards"
    if not (out / "shards").exists():
        write_subset(OUT / "train-all.npy", [r["uid"] for r in Pool(pool).samples()])
        reshard(pool, OUT / "train-all.npy", out, shard_size=2000, progress=False)
    return out


def ours(shards, steps, batch, warm) -> tuple[float, float]:
    run = OUT / "train-ours"
    shutil.rmtree(run, ignore_errors=True)
    config = TrainConfig(
        train_data=str(shards),
        out=str(run),
        model="unparrot-rn-tiny",
        samples=steps * batch,
        batch_size=batch,
        loader_workers=1,
        progress=False,
    )
    launch(config, log=OUT / "train-ours.log").wait()  # a process of its own, like open_clip's trainer below
    m = [json.loads(ln) for ln in open(run / "metrics.jsonl")][warm:]
    step = np.array([x["step_seconds"] for x in m])
    wait = np.array([x["wait_seconds"] for x in m])
    return batch / step.mean(), wait.sum() / step.sum()


def open_clip_trainer(shards, steps, batch, warm) -> tuple[float, float]:
    from unparrot.train.openclip import open_clip_command

    logs = OUT / "train-openclip"
    shutil.rmtree(logs, ignore_errors=True)
    cmd = open_clip_command(
        shards, logs, "oc", samples=steps * batch, batch_size=batch, workers=1, extra=["--save-frequency", "0"]
    )
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    log = (logs / "oc" / "out.log").read_text()
    rows = re.findall(r"\[\s*(\d+)/\d+.*?Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+)", log)
    rows = [(int(s) // batch, float(d), float(b)) for s, d, b in rows if int(s) // batch >= warm]
    data = np.array([r[1] for r in rows])
    bt = np.array([r[2] for r in rows])
    return batch / bt.mean(), data.sum() / bt.sum()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    shards = shards_dir()
    warm = 10
    o_sps, o_wait = ours(shards, a.steps, a.batch, warm)
    b_sps, b_wait = open_clip_trainer(shards, a.steps, a.batch, warm)
    ok = report("unparrot train vs open_clip_train.main (unparrot-rn-tiny, batch 64)", o_sps, b_sps, "samples/s", 1.0)
    print(
        f"data wait share of step time: ours {100 * o_wait:.1f}% (target < 10%) {'OK' if o_wait < 0.1 else 'MISSED'}; "
        f"open_clip_train {100 * b_wait:.1f}%"
    )
    return 0 if ok and o_wait < 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
