"""`unparrot synth`: write a synthetic pool (webdataset shards) and labelled evaluation sets."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..flags import option
from ..imaging.decode import encode_image
from ..io.sizes import write_size_files
from ..io.tar import ShardWriter
from ..pool import atomic_write_bytes
from ..progress import progress_bar
from .world import (
    EVAL_SETS,
    ZEROSHOT_TEMPLATES,
    WorldConfig,
    config_digest,
    make_config,
    make_eval_sample,
    make_pool_sample,
    sample_uid,
)


def _pool_shard(cfg: WorldConfig, seed: int, shard: int, start: int, count: int, out: str, ns: str) -> dict:
    rng = np.random.default_rng([seed, 1, shard])
    kinds = {"object": 0, "text": 0, "parrot": 0}
    with ShardWriter(os.path.join(out, "shards", "{:05d}.tar"), max_count=count + 1, start=shard) as w:
        for i in range(start, start + count):
            img, caption, gt = make_pool_sample(cfg, rng)
            kinds[gt["kind"]] += 1
            uid = sample_uid(ns, i)
            meta = {
                "uid": uid,
                "key": f"{i:09d}",
                "caption": caption,
                "width": cfg.image_size,
                "height": cfg.image_size,
                "synth": gt,
            }
            w.write(
                f"{i:09d}",
                {
                    cfg.image_format: encode_image(img, cfg.image_format, cfg.jpeg_quality),
                    "txt": caption,
                    "json": json.dumps(meta),
                },
            )
    return kinds


def _eval_set(cfg: WorldConfig, seed: int, name: str, per_class: int, out: str, attack_size: float) -> int:
    """All variants use the same rng stream per image, so `clean` and `attack` show the same scenes."""
    d = Path(out) / "eval" / name
    n = 0
    with ShardWriter(str(d / "test" / "{}.tar"), max_count=10**9) as w:
        for label in range(len(cfg.classes)):
            for j in range(per_class):
                rng = np.random.default_rng([seed, 2, label, j])
                img, info = make_eval_sample(cfg, rng, label, name, attack_size)
                key = f"s{label:03d}_{j:05d}"
                w.write(
                    key,
                    {
                        cfg.eval_format: encode_image(img, cfg.eval_format),
                        "cls": str(label),
                        "txt": f"a {info['class']}",
                        "json": json.dumps(info),
                    },
                )
                n += 1
    (d / "test" / "nshards.txt").write_text("1\n")
    (d / "classnames.txt").write_text("\n".join(cfg.classes) + "\n")
    (d / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    return n


def _eval_sets(cfg, seed: int, out: Path, names, per_class: int, attack_size: float, workers: int) -> dict:
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=mp.get_context("spawn")) as ex:
        futs = {n: ex.submit(_eval_set, cfg, seed + 1000, n, per_class, str(out), attack_size) for n in names}
        return {n: f.result() for n, f in futs.items()}


def _remake_eval_sets(cfg, seed: int, out: Path, old: dict, request: dict, workers: int) -> dict:
    """Same pool, other evaluation settings: rewrite only the evaluation sets (the pool is kept)."""
    import shutil

    shutil.rmtree(out / "eval", ignore_errors=True)
    stats = dict(old, request=request)
    stats["eval_sets"] = _eval_sets(
        cfg, seed, out, request["eval_sets"], request["eval_per_class"], request["attack_size"], workers
    )
    stats = json.loads(json.dumps(stats, default=list))
    atomic_write_bytes(out / "synth.json", json.dumps(stats, indent=1).encode())
    return stats


@dataclasses.dataclass
class SynthConfig:
    """The options of `synth()` (its signature defaults read these; the CLI's flags are made from them)."""

    out: str = option(help="output folder (becomes a pool)", positional=True)
    n: int = option(10000, "number of pairs", short="-n")
    preset: str = option("laion", "laion (LAION-like statistics) or learnable (tiny-CLIP friendly)")
    seed: int = option(0, "seed of the world and its samples")
    shard_size: int = option(1000, "samples per shard")
    eval_per_class: int = option(50, "images per class in each evaluation set")
    eval_sets: tuple | None = option(EVAL_SETS, "evaluation sets to write (YAML list; null: none)")
    workers: int = option(2, "worker processes")
    attack_size: float = option(0.3, "attack font size / the image's short side")


def synth(
    out: str | os.PathLike,
    n: int = SynthConfig.n,
    preset: str = SynthConfig.preset,
    seed: int = SynthConfig.seed,
    shard_size: int = SynthConfig.shard_size,
    eval_per_class: int = SynthConfig.eval_per_class,
    eval_sets: tuple[str, ...] | None = SynthConfig.eval_sets,
    workers: int = SynthConfig.workers,
    attack_size: float = SynthConfig.attack_size,
    progress: bool = True,
    **overrides,
) -> dict:
    """Generate a synthetic pool of `n` pairs in `out/shards/` and evaluation sets in `out/eval/<set>/`.

    Deterministic for (preset, overrides, seed). Returns statistics (also written to `out/synth.json`);
    a rerun with the same arguments finds the finished pool and returns at once.
    """
    cfg = make_config(preset, **overrides)
    if n < 1 or shard_size < 1:
        raise ValueError("synth: n and shard_size must be positive")
    eval_sets = tuple(eval_sets or ())
    bad = [s for s in eval_sets if s not in EVAL_SETS]
    if bad:
        raise ValueError(f"synth: unknown eval sets {bad}; known: {', '.join(EVAL_SETS)}")
    out = Path(out)
    digest = config_digest(cfg, seed)
    marker = out / "synth.json"
    request = {
        "n": n,
        "seed": seed,
        "preset": preset,
        "shard_size": shard_size,
        "digest": digest,
        "eval_per_class": eval_per_class,
        "eval_sets": list(eval_sets),
        "attack_size": attack_size,
    }
    eval_keys = ("eval_per_class", "eval_sets", "attack_size")
    if marker.exists():
        old = json.loads(marker.read_text())
        if old.get("request") == request:
            return old
        same_pool = {k: v for k, v in old.get("request", {}).items() if k not in eval_keys} == {
            k: v for k, v in request.items() if k not in eval_keys
        }
        if not same_pool:
            raise FileExistsError(f"{out} already holds a different synthetic pool; choose another folder")
        return _remake_eval_sets(cfg, seed, out, old, request, workers)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ns = f"unparrot-synth:{digest}"
    jobs = [
        (cfg, seed, s, s * shard_size, min(shard_size, n - s * shard_size), str(out), ns)
        for s in range((n + shard_size - 1) // shard_size)
    ]
    kinds = {"object": 0, "text": 0, "parrot": 0}
    bar = progress_bar(total=n, desc="synth pool", unit="img", disable=not progress)
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=mp.get_context("spawn")) as ex:
        futs = [ex.submit(_pool_shard, *j) for j in jobs]
        evals = {
            name: ex.submit(_eval_set, cfg, seed + 1000, name, eval_per_class, str(out), attack_size)
            for name in eval_sets
        }
        for f, j in zip(futs, jobs):
            for k, v in f.result().items():
                kinds[k] += v
            bar.update(j[4])
        n_eval = {name: f.result() for name, f in evals.items()}
    bar.close()
    write_size_files(out / "shards")  # sizes.json + {shard}_stats.json, for open_clip_train and DataComp
    stats = {
        "request": request,
        "config": dataclasses.asdict(cfg),
        "samples": n,
        "shards": len(jobs),
        "kinds": kinds,
        "share_with_text": (kinds["text"] + kinds["parrot"]) / n,
        "eval_sets": n_eval,
        "seconds": round(time.time() - t0, 1),
    }
    stats = json.loads(json.dumps(stats, default=list))  # the same value a rerun reads back
    atomic_write_bytes(marker, json.dumps(stats, indent=1).encode())
    return stats
