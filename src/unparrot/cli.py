"""Command line: one subcommand per public function; each is a thin wrapper that parses, calls, prints."""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml


def _kv(items: list[str] | None) -> dict:
    """--param key=value pairs; values are parsed as YAML scalars/lists (3, 0.5, true, [1, 2])."""
    out = {}
    for it in items or ():
        if "=" not in it:
            raise SystemExit(f"error: --param wants key=value, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


def _print(obj):
    print(obj.line() if hasattr(obj, "line") else json.dumps(obj, indent=1, default=str))


# ---- foundation ---------------------------------------------------------------------------------
def cmd_synth(a):
    from .synth.generate import synth
    from .synth.stats import format_truth_stats, truth_stats

    s = synth(a.out, n=a.n, preset=a.preset, seed=a.seed, shard_size=a.shard_size,
              eval_per_class=a.eval_per_class, workers=a.workers, progress=not a.quiet, **_kv(a.param))
    print(f"synth: {s['samples']} pairs in {s['shards']} shards, {sum(s['eval_sets'].values())} evaluation "
          f"images in {len(s['eval_sets'])} sets ({s['seconds']}s) -> {a.out}")
    if a.stats:
        print(format_truth_stats(truth_stats(a.out)))


def cmd_ingest(a):
    from .io.ingest import ingest

    _print(ingest(a.source, a.pool, format=a.format, shard_size=a.shard_size, image_col=a.image_col,
                  caption_col=a.caption_col, path_col=a.path_col, image_root=a.image_root, sep=a.sep,
                  caption_fields=tuple(a.caption_fields.split(",")), caption_join=a.caption_join,
                  progress=not a.quiet))


def cmd_run(a):
    from .engine import run

    _print(run(a.pool, a.op, _kv(a.param), stage=a.stage, engine=a.engine, workers=a.workers,
               batch_size=a.batch_size, overwrite=a.overwrite, progress=not a.quiet))


def cmd_reshard(a):
    from .io.reshard import reshard

    _print(reshard(a.pool, a.subset, a.out, shard_size=a.shard_size, columns=a.columns or None,
                   mask_text=a.mask_text, mask_fill=a.mask_fill, progress=not a.quiet))


def cmd_info(a):
    from .pool import Pool
    from .engine.local import stage_counts

    pool = Pool(a.pool)
    shards = pool.shards()
    print(f"pool {pool.root}: {len(shards)} shards")
    for st in pool.stages():
        c = stage_counts(pool, st, [s.id for s in shards])
        info = pool.stage_info(st) or {}
        print(f"  {st:<16} {len(pool.done_shards(st))}/{len(shards)} shards, {c['n_ok']} rows, {c['n_err']} errors"
              f"  [{info.get('op', '?')}]")
    subs = sorted((pool.root / "subsets").glob("*.npy")) if (pool.root / "subsets").exists() else []
    for p in subs:
        import numpy as np

        print(f"  subset {p.stem:<12} {len(np.load(p, mmap_mode='r'))} uids")
    if a.truth:
        from .synth.stats import format_truth_stats, truth_stats

        print(format_truth_stats(truth_stats(pool)))


def cmd_demo(a):
    from .demo import demo

    demo(out=a.out, size=a.size, seed=a.seed, workers=a.workers)


# ---- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unparrot", description=(
        "Find, measure and remove the text-spotting (parrot caption) bias in image-text data for CLIP."))
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, fn, help, desc=None):
        sp = sub.add_parser(name, help=help, description=desc or help,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sp.set_defaults(fn=fn)
        return sp

    def common(sp, workers=2):
        sp.add_argument("--workers", type=int, default=workers, help="worker processes")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    sp = add("synth", cmd_synth, "generate a synthetic parrot-world pool and evaluation sets",
             "Generate a synthetic pool of image-caption pairs (some with embedded text their captions parrot), "
             "with ground truth in each sample's .json, plus labelled evaluation sets in CLIP_benchmark's layout.")
    sp.add_argument("out", help="output folder (becomes a pool)")
    sp.add_argument("-n", type=int, default=10000, help="number of pairs")
    sp.add_argument("--preset", default="laion", help="laion (LAION-like statistics) or learnable (tiny-CLIP friendly)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--shard-size", type=int, default=1000)
    sp.add_argument("--eval-per-class", type=int, default=50, help="images per class in each evaluation set")
    sp.add_argument("--param", action="append", metavar="KEY=VALUE", help="override a world parameter")
    sp.add_argument("--stats", action="store_true", help="print ground-truth text statistics")
    common(sp)

    sp = add("ingest", cmd_ingest, "make a pool from shards, parquet, a CSV/JSONL table, ImageNet-Captions or a folder",
             "Tar shards are used in place (never copied); other inputs are written as shards into POOL/shards.")
    sp.add_argument("source", help="shard folder/glob/{a..b} pattern, .parquet, .csv/.tsv/.jsonl, ImageNet-Captions .json, or image folder")
    sp.add_argument("pool", help="pool folder to create")
    sp.add_argument("--format", default="auto", help="auto, wds, parquet, table, imagenet-captions, folder")
    sp.add_argument("--shard-size", type=int, default=10000)
    sp.add_argument("--image-col", help="parquet column with image bytes")
    sp.add_argument("--path-col", help="column with image paths")
    sp.add_argument("--caption-col", help="column with captions")
    sp.add_argument("--image-root", help="folder that image paths are relative to (default: the table's folder)")
    sp.add_argument("--sep", help="CSV separator (default: tab for .tsv, comma otherwise)")
    sp.add_argument("--caption-fields", default="title,tags,description", help="ImageNet-Captions fields joined into the caption")
    sp.add_argument("--caption-join", default=" ", help="separator between ImageNet-Captions fields")
    sp.add_argument("--quiet", action="store_true")

    sp = add("run", cmd_run, "run any per-sample operator over a pool (generic stage runner)")
    sp.add_argument("pool")
    sp.add_argument("op", help="operator name (inspect, spot, parrot, embed, aesthetic) or module:Class")
    sp.add_argument("--param", action="append", metavar="KEY=VALUE", help="operator parameter")
    sp.add_argument("--stage", help="output stage name (default: the operator name)")
    sp.add_argument("--engine", default="local", help="local or ray")
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--overwrite", action="store_true", help="recompute a stage made with other parameters")
    common(sp)

    sp = add("reshard", cmd_reshard, "write a subset of a pool as new shards",
             "Write the samples whose uid is in SUBSET (a DataComp .npy) as new webdataset shards in OUT/shards.")
    sp.add_argument("pool")
    sp.add_argument("subset", help="subset .npy (sorted uids, dtype u8,u8)")
    sp.add_argument("out", help="output folder")
    sp.add_argument("--shard-size", type=int, default=10000)
    sp.add_argument("--columns", nargs="*", help="columns (stage.column or column) to add to each .json")
    sp.add_argument("--mask-text", action="store_true", help="write images with text boxes masked (needs spot)")
    sp.add_argument("--mask-fill", default="mean", help="mean, inpaint or solid")
    sp.add_argument("--quiet", action="store_true")

    sp = add("info", cmd_info, "show a pool's shards, stages, counts and subsets")
    sp.add_argument("pool")
    sp.add_argument("--truth", action="store_true", help="also print synthetic ground-truth statistics")

    sp = add("demo", cmd_demo, "run the whole pipeline on a synthetic world and report the findings")
    sp.add_argument("--out", default="demo-out", help="output folder (a rerun resumes)")
    sp.add_argument("--size", default="default", help="small (CI check), default, full or large")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--workers", type=int, default=2)
    return p


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "fn", None):
        parser.print_help()
        return 2
    try:
        a.fn(a)
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        if os.environ.get("UNPARROT_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"unparrot {a.command}: error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
