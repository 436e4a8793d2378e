"""`unparrot select POOL RECIPE`: a recipe over the pool's columns -> a DataComp subset and a funnel.

A recipe (YAML; built-ins in unparrot/recipes/) is validated completely (expressions parsed, columns
found, types checked, sizes resolvable) before any column is loaded:

    name: parrot-debiased
    description: ...
    params: {min_clip_score: 0.3}          # defaults for ${...} placeholders, overridable (--set)
    where:                                  # applied in order; each step is a row of the funnel
      - has_text == false
      - clip_score > ${min_clip_score}
      - {expr: aesthetic > 4.5, optional: true}   # skipped (and reported) when a column is absent
      - keep_dedup
    rank_by: masked_clip_score              # optional: keep the highest rows (or `random`) ...
    size: {fraction: 0.5}                   # ... down to a size: fraction of the pool, count, or
                                            #     {like: other-recipe} (the size of that subset)
    seed: 0

Rows where a needed column is missing (the stage failed on that sample) never pass a condition.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ..flags import key_values, option
from ..pool import Pool, atomic_write_bytes, write_subset
from .expr import ExprError, check, columns_of, evaluate, parse, rank_mask

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RecipeError(ValueError):
    pass


@dataclass
class Step:
    expr: str
    tree: tuple
    name: str
    optional: bool = False


@dataclass
class Recipe:
    name: str
    steps: list[Step] = field(default_factory=list)
    rank_by: str | None = None
    size: dict | None = None
    seed: int = 0
    description: str = ""
    params: dict = field(default_factory=dict)

    def columns(self) -> set[str]:
        cols = set().union(*(columns_of(s.tree) for s in self.steps)) if self.steps else set()
        if self.rank_by and self.rank_by != "random":
            cols.add(self.rank_by)
        return cols


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(spec: str | dict, overrides: dict | None = None) -> Recipe:
    """A recipe from a built-in name, a YAML file path or a dict; `${param}` placeholders are filled from
    `params` then `overrides`. Raises RecipeError/ExprError for anything malformed."""
    if isinstance(spec, dict):
        raw, origin = spec, "<dict>"
    elif os.path.exists(spec):
        raw, origin = yaml.safe_load(Path(spec).read_text()), spec
    elif (RECIPE_DIR / f"{spec}.yaml").exists():
        raw, origin = yaml.safe_load((RECIPE_DIR / f"{spec}.yaml").read_text()), f"built-in {spec}"
    else:
        raise RecipeError(f"no recipe {spec!r}: not a file and not a built-in ({', '.join(builtin_recipes())})")
    if not isinstance(raw, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping with name, where, rank_by, size")
    unknown = set(raw) - {"name", "description", "params", "where", "rank_by", "size", "seed"}
    if unknown:
        raise RecipeError(f"{origin}: unknown recipe keys {sorted(unknown)}")
    params = dict(raw.get("params") or {})
    for k, v in (overrides or {}).items():
        if k not in params:
            raise RecipeError(f"{origin}: recipe has no parameter {k!r} (parameters: {', '.join(params) or 'none'})")
        params[k] = v
    for k, v in params.items():
        if not isinstance(v, (int, float, str, bool)):
            raise RecipeError(f"{origin}: parameter {k} must be a number, text or true/false")

    def fill(text: str) -> str:
        def sub(m):
            if m.group(1) not in params:
                raise RecipeError(f"{origin}: unknown placeholder ${{{m.group(1)}}}")
            v = params[m.group(1)]
            return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else repr(v)

        return _PLACEHOLDER.sub(sub, text)

    steps = []
    where = raw.get("where") or []
    if not isinstance(where, list):
        raise RecipeError(f"{origin}: `where` must be a list of conditions")
    for i, item in enumerate(where):
        if isinstance(item, dict):
            bad = set(item) - {"expr", "name", "optional"}
            if bad or "expr" not in item:
                raise RecipeError(f"{origin}: condition {i + 1} must be a string or {{expr, name, optional}}")
            text, name, optional = str(item["expr"]), item.get("name"), bool(item.get("optional", False))
        elif isinstance(item, (str, bool)):
            text, name, optional = str(item).lower() if isinstance(item, bool) else item, None, False
        else:
            raise RecipeError(f"{origin}: condition {i + 1} is a {type(item).__name__}, not an expression")
        text = fill(text)
        steps.append(Step(text, parse(text), name or text, optional))
    size = raw.get("size")
    if size is not None:
        if not isinstance(size, dict) or len(size) != 1 or next(iter(size)) not in ("fraction", "count", "like"):
            raise RecipeError(f"{origin}: size must be one of {{fraction: f}}, {{count: n}}, {{like: recipe}}")
        ((kind, v),) = size.items()
        if isinstance(v, str) and kind != "like":
            v = yaml.safe_load(fill(v))
        elif isinstance(v, str):
            v = fill(v).strip('"')
        if kind == "fraction" and not (isinstance(v, (int, float)) and 0 < float(v) <= 1):
            raise RecipeError(f"{origin}: size fraction must be in (0, 1]")
        if kind == "count" and not (isinstance(v, int) and v >= 0):
            raise RecipeError(f"{origin}: size count must be a non-negative integer")
        size = {kind: v}
    rank_by = raw.get("rank_by")
    if rank_by is not None and not (isinstance(rank_by, str) and re.fullmatch(r"[A-Za-z_][\w]*(\.\w+)?", rank_by)):
        raise RecipeError(f"{origin}: rank_by must be a column name or 'random'")
    return Recipe(
        name=str(raw.get("name") or Path(str(spec)).stem),
        steps=steps,
        rank_by=rank_by,
        size=size,
        seed=int(raw.get("seed", 0)),
        description=str(raw.get("description", "")),
        params=params,
    )


def column_types(pool: Pool) -> tuple[dict[str, str], dict[str, str]]:
    """(type of each column, stage holding it). Ambiguous bare names are only reachable as stage.column."""
    import pyarrow as pa

    types, where, seen = {}, {}, {}
    for st in pool.stages():
        schema = pool.stage_schema(st)
        if schema is None:
            continue
        for f in schema:
            if f.name in ("uid", "key"):
                continue
            t = (
                "bool"
                if pa.types.is_boolean(f.type)
                else "num"
                if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
                else "str"
                if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
                else "list"
                if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
                else "other"
            )
            types[f"{st}.{f.name}"], where[f"{st}.{f.name}"] = t, st
            seen.setdefault(f.name, []).append((st, t))
    for name, hits in seen.items():
        if len(hits) > 1:  # several stages: a bare name means the stage with its operator's default name
            default = [h for h in hits if (pool.stage_info(h[0]) or {}).get("op") == h[0]]
            if len(default) == 1:
                hits = default
        if len(hits) == 1:
            types[name], where[name] = hits[0][1], hits[0][0]
        else:
            types[name] = "ambiguous:" + ",".join(h[0] for h in hits)
    return types, where


def made_by(column: str) -> str | None:
    """The command that makes a column of a built-in stage (for the error when a recipe needs one the pool
    lacks), from the stages' declared schemas; None for a column no built-in stage writes."""
    from ..ops.aesthetic import Aesthetic
    from ..ops.inspect import Inspect
    from ..ops.parrot import Parrot
    from ..ops.spot import Spot
    from ..rewrite import REWRITE_SCHEMA
    from .cluster import CLUSTER_SCHEMA

    makers = [
        ("unparrot profile POOL", [*Spot.schema, *Parrot.schema]),
        ("unparrot embed POOL --model ... --pretrained ...", ["clip_score", "image", "text"]),
        ("unparrot embed POOL --masked ... (after profile)", ["masked_clip_score"]),
        ("unparrot cluster POOL (after embed)", [c for c in CLUSTER_SCHEMA if c not in ("uid", "key")]),
        ("unparrot aesthetic POOL --weights FILE (after embed with ViT-L-14)", list(Aesthetic.schema)),
        ("unparrot rewrite POOL", list(REWRITE_SCHEMA)),
        ("unparrot run POOL inspect", list(Inspect.schema)),
    ]
    name = column.split(".", 1)[-1]
    return next((cmd for cmd, cols in makers if name in cols), None)


def _missing_column(pool: Pool, column: str, where: str, types: dict) -> ExprError:
    cmd = made_by(column)
    if cmd is None:
        avail = sorted(c for c, t in types.items() if "." not in c and not t.startswith("ambiguous"))
        return ExprError(f"unknown column {column!r} in {where}; available: {', '.join(avail)}")
    return ExprError(f"{where} needs column {column!r}, which no stage of {pool.root} has: run `{cmd}` first")


@dataclass
class Selection:
    name: str
    uids: list
    funnel: list
    pool_rows: int
    path: str
    stats: dict

    def line(self) -> str:
        steps = "; ".join(
            f"{f['step']}: skipped ({f['skipped']})" if f.get("skipped") else f"{f['step']}: -{f['removed']}"
            for f in self.funnel
        )
        return (
            f"select {self.name}: {len(self.uids)} of {self.pool_rows} samples "
            f"({100 * len(self.uids) / max(1, self.pool_rows):.1f}%) -> {self.path}  [{steps}]"
        )


@dataclass
class SelectConfig:
    """The options of `select()` besides the recipe (its signature defaults read these)."""

    out: str | None = option(None, "subset path (default POOL/subsets/<name>.npy)")
    name: str | None = option(None, "subset name (default: the recipe name)")
    overrides: dict | None = key_values("recipe parameter, e.g. min_clip_score=0.28 (repeatable)", aliases=("--set",))
    size_like: str | None = option(None, "cut to the size of another subset (random control)")


def select(
    pool: Pool | str,
    recipe: str | dict | Recipe,
    out: str | os.PathLike | None = SelectConfig.out,
    name: str | None = SelectConfig.name,
    overrides: dict | None = SelectConfig.overrides,
    size_like: str | None = SelectConfig.size_like,
) -> Selection:
    """Apply a recipe: write POOL/subsets/<name>.npy (DataComp u8,u8 uids, sorted) and <name>.json (funnel)."""
    pool = pool if isinstance(pool, Pool) else Pool(pool)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    if size_like:
        rec.size = {"like": size_like}
    name = name or rec.name
    types, where = column_types(pool)
    steps = _typed_steps(pool, rec, types)
    target = _size_of_other_subset(pool, rec.size["like"]) if rec.size and "like" in rec.size else None
    needed = _needed_columns(steps, rec)
    check_complete(pool, sorted({where[c] for c in needed} | ({where["has_text"]} if "has_text" in where else set())))
    t0 = time.time()
    path = Path(out) if out else pool.subset_path(name)
    _remove_stale_temp_files(path)
    cols, uids, shards = _load(pool, needed, where)
    n = len(uids)
    mask, funnel = _apply_conditions(steps, cols, n)
    if rec.size:
        mask, row = _apply_size(rec, mask, cols, target)
        funnel.append(row)
    kept = [u for u, k in zip(uids, mask) if k]
    stats = {
        "recipe": rec.name,
        "description": rec.description,
        "params": rec.params,
        "pool_rows": n,
        "kept": len(kept),
        "funnel": funnel,
        "seconds": round(time.time() - t0, 2),
        "kept_by_shard": _kept_by_shard(shards, mask),
    }
    if "has_text" in types:
        stats.update(_share_with_text(pool, where, uids, mask))
    # everything is computed before anything is written; the subset (what reshard reads) comes last, so a
    # killed select never leaves a subset file without its funnel
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(stats, indent=1).encode())
    write_subset(path, kept)
    return Selection(name, kept, funnel, n, str(path), stats)


def _typed_steps(pool: Pool, rec: Recipe, types: dict[str, str]) -> list[tuple[Step, str | None]]:
    """Each condition with its type checked against the pool's columns before any column is loaded (None for
    an optional condition whose column is absent: skipped and reported), and the rank column checked too, so
    a recipe that cannot run fails in a second, not after loading a billion rows."""
    steps = []
    for s in rec.steps:
        missing = [c for c in columns_of(s.tree) if c not in types]
        if missing and s.optional:
            steps.append((s, None))
            continue
        if missing:
            raise _missing_column(pool, missing[0], f"condition {s.expr!r}", types)
        t = check(s.tree, types, s.expr)
        if t != "bool":
            raise ExprError(f"condition {s.expr!r} is a {t}, not true/false (compare it: e.g. `{s.expr} > 0`)")
        steps.append((s, t))
    if rec.rank_by and rec.rank_by != "random":
        if rec.rank_by not in types:
            raise _missing_column(pool, rec.rank_by, "rank_by", types)
        if types[rec.rank_by] != "num":
            raise ExprError(f"rank_by: {rec.rank_by!r} is not numeric")
    return steps


def _needed_columns(steps: list[tuple[Step, str | None]], rec: Recipe) -> list[str]:
    """The columns to load: those of the conditions that run and the rank column, nothing else (a pool's
    embeddings or captions are never loaded by a recipe that does not name them)."""
    ranked = {rec.rank_by} if rec.rank_by and rec.rank_by != "random" else set()
    return sorted({c for s, t in steps if t is not None for c in columns_of(s.tree)} | ranked)


def _size_of_other_subset(pool: Pool, other: str) -> int:
    """The size of subset `other` (size: {like: other}): comparing two recipes is fair at equal sizes."""
    path = pool.root / "subsets" / f"{other}.json"
    if not path.exists():
        raise FileNotFoundError(f"size like {other!r}: run that recipe first ({path} missing)")
    return int(json.loads(path.read_text())["kept"])


def _remove_stale_temp_files(path: Path) -> None:
    """Remove the temp files a killed select of this subset left (they are never read, only in the way)."""
    for f in (path, path.with_suffix(".json")):
        for stale in path.parent.glob(f".{f.name}.*.tmp"):
            stale.unlink(missing_ok=True)


def _apply_conditions(steps: list[tuple[Step, str | None]], cols: dict, n: int) -> tuple[np.ndarray, list[dict]]:
    """The recipe's conditions in order: (rows passing all of them, one funnel row per condition, so the
    subset's record says what each condition removed)."""
    mask = np.ones(n, bool)
    funnel = []
    for s, t in steps:
        before = int(mask.sum())
        if t is None:
            funnel.append(
                {
                    "step": s.name,
                    "expr": s.expr,
                    "before": before,
                    "after": before,
                    "removed": 0,
                    "skipped": "column absent",
                }
            )
            continue
        m = evaluate(s.tree, cols, n)
        m = m if isinstance(m, np.ndarray) else np.full(n, bool(m))
        mask &= m.astype(bool)
        funnel.append(_funnel_row(s.name, s.expr, before, mask))
    return mask, funnel


def _apply_size(rec: Recipe, mask: np.ndarray, cols: dict, target: int | None) -> tuple[np.ndarray, dict]:
    """Cut the passing rows down to the recipe's size: the highest by `rank_by`, or a seeded random sample.
    Returns the new mask and its funnel row."""
    n = len(mask)
    if "fraction" in rec.size:
        target = int(round(float(rec.size["fraction"]) * n))
    elif "count" in rec.size:
        target = int(rec.size["count"])
    before = int(mask.sum())
    ranked = rec.rank_by and rec.rank_by != "random"
    if before > target:
        idx = np.flatnonzero(mask)
        if ranked:
            v = np.asarray(cols[rec.rank_by], float)[idx]
            keep = idx[rank_mask(v, target / len(idx), highest=True)]
        else:
            keep = np.random.default_rng(rec.seed).choice(idx, target, replace=False)
        mask = np.zeros(n, bool)
        mask[keep] = True
    how = f"top by {rec.rank_by}" if ranked else "random sample"
    return mask, _funnel_row(f"size {target} ({how})", json.dumps(rec.size), before, mask)


def _funnel_row(step: str, expr: str, before: int, mask: np.ndarray) -> dict:
    return {"step": step, "expr": expr, "before": before, "after": int(mask.sum()), "removed": before - int(mask.sum())}


def _kept_by_shard(shards: list, mask: np.ndarray) -> dict[str, int]:
    """How many kept rows each shard holds (a reshard's input, and a check that no shard was lost)."""
    if not len(mask):
        return {}
    return {s: int(c) for s, c in zip(*np.unique(np.asarray(shards, object)[mask].astype(str), return_counts=True))}


def _share_with_text(pool: Pool, where: dict[str, str], uids: list, mask: np.ndarray) -> dict[str, float]:
    """The share of text-bearing images in the pool and in the subset, over the recipe's rows (a sample
    `spot` kept but another stage lost is not in them, and back): what a text-aware recipe changes."""
    ht = _as_float(_aligned(pool, "has_text", where, uids))
    return {
        "share_with_text_pool": float(np.nanmean(ht)) if len(mask) and not np.isnan(ht).all() else float("nan"),
        "share_with_text_subset": float(np.nanmean(ht[mask])) if mask.any() and not np.isnan(ht[mask]).all() else 0.0,
    }


def check_complete(pool: Pool, stages) -> None:
    """Refuse stages that do not cover every shard of the pool (killed, or run on some shards only): their
    missing rows would count as removed by the recipe's conditions."""
    stages = list(stages)
    # a pool of columns only (no shards) is checked against the union of its stages' shards
    all_ids = [s.id for s in pool.shards()] or sorted(set().union(*(pool.done_shards(st) for st in stages)))
    for st in stages:
        done = set(pool.done_shards(st))
        missing = [sid for sid in all_ids if sid not in done]
        if missing:
            raise RuntimeError(
                f"stage {st!r} is incomplete: no output for {len(missing)} of {len(all_ids)} shards "
                f"(e.g. {missing[0]}); rerun the command that makes it to finish it, then select"
            )


def _aligned(pool: Pool, column: str, where: dict[str, str], uids: list) -> np.ndarray:
    """`column` for exactly the rows `uids`, in their order (None where its stage has no row)."""
    import pandas as pd

    df = _load(pool, [column], where)
    got = pd.DataFrame({"uid": df[1], column: df[0][column]})
    return pd.DataFrame({"uid": uids}).merge(got, on="uid", how="left")[column].to_numpy(dtype=object)


def _as_float(v):
    return np.array([np.nan if x is None or x != x else float(x) for x in v]) if v.dtype == object else v.astype(float)


def _load(pool: Pool, columns: list[str], where: dict[str, str]):
    """The needed columns over the union of the uids of every stage (rows missing in a stage are None)."""
    import pandas as pd

    stages = sorted({where[c] for c in columns}) or [s for s in pool.stages() if pool.done_shards(s)][:1]
    if not stages:
        raise FileNotFoundError(f"{pool.root} has no stage output: run profile/embed/cluster first")
    frames = []
    for st in stages:
        mine = [c for c in columns if where[c] == st]
        plain = [c.split(".", 1)[1] if c.startswith(st + ".") else c for c in mine]
        df = pool.load(st, columns=plain)
        df = df.rename(columns=dict(zip(plain, mine)))[["uid", "shard"] + mine]
        frames.append(df)
    base = frames[0]
    for df in frames[1:]:
        extra = df[~df["uid"].isin(base["uid"])][["uid", "shard"]]
        base = pd.concat([base, extra], ignore_index=True).merge(df.drop(columns=["shard"]), on="uid", how="left")
    cols = {}
    for c in columns:
        s = base[c]
        cols[c] = s.to_numpy(dtype=object) if s.dtype == object or str(s.dtype) in ("string", "str") else s.to_numpy()
        if cols[c].dtype == object and all(isinstance(x, (bool, np.bool_)) for x in cols[c]):
            cols[c] = cols[c].astype(bool)
    return cols, base["uid"].tolist(), base["shard"].tolist()
