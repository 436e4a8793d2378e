"""The demo's protocol (protocols/demo.yaml, docs/protocol.md) and the verdicts it defines.

The findings, sizes, worlds and the effective-robustness design are data, not code: a protocol is a YAML
file written before the runs it reports, and changing it is a dated entry in its `changes` list. Adding
a model and a finding is an edit of that file (`models:` and `findings:`). This module reads a protocol,
checks it, gathers each finding's per-item outcomes from one or several demo runs (one per seed) and turns
them into holds / fails / inconclusive / not run with a hierarchical bootstrap interval
(evaluate/verdicts.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import yaml

from .evaluate.verdicts import Claim, bootstrap, judge, mean_difference

METRICS = ("acc", "attack_success", "sync_gap", "text_share", "kept_ratio", "er")
PROTOCOLS = Path(__file__).parent / "protocols"


@dataclass
class DemoSize:
    """One size of the demo (the protocol's `sizes`)."""

    n: int
    steps: int
    eval_per_class: int
    models: tuple
    rewrite_captions: int  # unique captions rewritten, most frequent first (0: all)
    rewrite_k: int = 1
    batch: int = 64
    shard_size: int = 1000
    er: dict | None = None  # pairs_scale, steps_scale, eval_per_class, shard_size; None: ER not run


@dataclass
class Protocol:
    name: str
    path: str
    verdict: dict
    world: dict
    train: dict
    models: dict  # name -> {"subset": recipe name or YAML, "rewrites": bool, "train_args": extra `train` flags,
    #                        "caption_column": the column the shards' .txt comes from (None: the caption)}
    sizes: dict  # name -> DemoSize
    findings: list
    curation: dict  # min_clip_score_quantile, dedup_fraction
    er: dict = field(default_factory=dict)
    changes: list = field(default_factory=list)
    chosen_on_results: list = field(default_factory=list)

    def claim(self, f: dict) -> Claim:
        return Claim(str(f["claim"]), float(f.get("margin", 0.0)))

    def er_runs(self, size: str) -> dict:
        """name -> {world, pairs, steps, family: bool, checkpoint_every} scaled to `size` (empty: not run)."""
        sc = self.sizes[size].er
        if not sc or not self.er:
            return {}
        runs = {}
        every = max(1, round(self.er["checkpoint_every"] * sc["steps_scale"]))
        for group in ("family", "treatments"):
            for name, r in self.er[group].items():
                pairs = int(round(r["pairs"] * sc["pairs_scale"]))
                if pairs % sc["shard_size"]:
                    raise ValueError(f"protocol {self.name}: ER run {name}: {pairs} pairs is not whole shards")
                runs[name] = {
                    "world": r["world"],
                    "pairs": pairs,
                    "steps": max(1, int(round(r["steps"] * sc["steps_scale"]))),
                    "family": group == "family",
                    "checkpoint_every": every,
                }
        return runs


def load_protocol(name_or_path: str | os.PathLike = "demo") -> Protocol:
    """A built-in protocol by name (protocols/<name>.yaml) or a YAML file; checked before anything runs."""
    p = Path(name_or_path)
    if not p.suffix:
        p = PROTOCOLS / f"{name_or_path}.yaml"
    if not p.exists():
        known = ", ".join(sorted(x.stem for x in PROTOCOLS.glob("*.yaml")))
        raise FileNotFoundError(f"protocol {name_or_path!r} not found (built-in: {known}, or a YAML file)")
    d = yaml.safe_load(p.read_text())
    size_fields = {f.name for f in fields(DemoSize)}
    sizes = {}
    for k, v in d["sizes"].items():
        bad = set(v) - size_fields
        if bad:
            raise ValueError(f"protocol {p}: size {k}: unknown keys {sorted(bad)}")
        sizes[k] = DemoSize(**{**v, "models": tuple(v["models"])})
    models = {
        m: {
            "subset": v["subset"],
            "rewrites": bool(v.get("rewrites", False)),
            "train_args": list(v.get("train_args", [])),
            "caption_column": v.get("caption_column"),
        }
        for m, v in d["models"].items()
    }
    proto = Protocol(
        name=d.get("name", p.stem),
        path=str(p),
        verdict=d["verdict"],
        world=d["world"],
        train=d["train"],
        models=models,
        sizes=sizes,
        findings=d["findings"],
        er=d.get("er") or {},
        curation=d["curation"],
        changes=d.get("changes") or [],
        chosen_on_results=d.get("chosen_on_results") or [],
    )
    _check(proto)
    return proto


def _check(p: Protocol):
    if not p.changes or not all("date" in c and "change" in c for c in p.changes):
        raise ValueError(f"protocol {p.path}: `changes` must list dated entries (date, change)")
    for s, cfg in p.sizes.items():
        bad = [m for m in cfg.models if m not in p.models]
        if bad:
            raise ValueError(f"protocol {p.path}: size {s} trains unknown models {bad}")
    for m, v in p.models.items():
        if v["caption_column"] and v["rewrites"]:  # rewrites are of the original captions: they would re-parrot
            raise ValueError(
                f"protocol {p.path}: model {m}: rewrites are of the original captions; they do not "
                "combine with caption_column"
            )
    for w in {r["world"] for g in ("family", "treatments") for r in p.er.get(g, {}).values()}:
        if w not in p.er.get("worlds", {}):
            raise ValueError(f"protocol {p.path}: ER world {w!r} is not defined under er.worlds")
    ids = [f.get("id") for f in p.findings]
    if len(set(ids)) != len(ids) or None in ids:
        raise ValueError(f"protocol {p.path}: every finding needs a unique id")
    for f in p.findings:
        where = f"protocol {p.path}: finding {f['id']}"
        if f.get("metric") not in METRICS:
            raise ValueError(f"{where}: metric is one of {', '.join(METRICS)}")
        p.claim(f)  # a bad claim is an error now, not after the runs
        if f["metric"] == "er":
            if f["treatment"] not in p.er.get("treatments", {}):
                raise ValueError(f"{where}: ER treatment {f['treatment']!r} is not under er.treatments")
            bad = [s for s in f.get("shifts", []) if s not in p.er["shifts"]]
            if not f.get("shifts") or bad:
                raise ValueError(f"{where}: shifts must be a non-empty subset of er.shifts")
        elif f["metric"] == "text_share":
            if f["treatment"] not in p.models:
                raise ValueError(f"{where}: unknown model {f['treatment']!r}")
        else:
            if f["metric"] == "kept_ratio" and not float(f.get("ratio", 0)) > 0:
                raise ValueError(f"{where}: metric kept_ratio needs a ratio > 0 (treatment kept / control kept)")
            if f.get("control_set") and f["metric"] != "attack_success":
                raise ValueError(f"{where}: control_set is an option of metric attack_success")
            for role in ("treatment", "control"):
                if f.get(role) not in p.models:
                    raise ValueError(f"{where}: {role} {f.get(role)!r} is not a model of the protocol")
            if f["metric"] == "acc" and not f.get("set"):
                raise ValueError(f"{where}: metric acc needs a set")


# ---- per-item data of one finding in one run ----------------------------------------------------------
def _per_item(o: dict, metric: str) -> np.ndarray:
    if metric == "acc":
        return (o["pred"] == o["label"]).astype(float)
    if metric == "attack_success":
        valid = o["attack_label"] >= 0
        return np.where(valid, (o["pred"] == o["attack_label"]).astype(float), np.nan)
    return (o["matched"] - o["mismatched"]).astype(float)  # sync_gap


def _item_values(res: Path, model: str, f: dict) -> dict | None:
    """Item key -> the model's outcome for the finding (nan: not scored); None when it was not evaluated.

    A list of sets gives, per image, the mean over them (the shifted sets show the same scenes, so the
    image, not the image-and-set, is the item the bootstrap draws). `control_set` (attack success) gives
    attack success minus the rate the same wrong class is named when a non-class word stands in the same
    place (the same scene and key in both sets): an occluding word that is not read scores zero."""
    from .evaluate.results import read_outcomes

    if f["metric"] == "sync_gap":
        o = read_outcomes(res, model, "sync", "rendered-vocab")
        return None if o is None else dict(zip(o["key"].tolist(), _per_item(o, "sync_gap")))
    sets = f.get("set", "attack")
    sets = [sets] if isinstance(sets, str) else list(sets)
    outs = [read_outcomes(res, model, "zeroshot", d) for d in sets]
    if any(o is None for o in outs):
        return None
    per = [dict(zip(o["key"].tolist(), _per_item(o, f["metric"]))) for o in outs]
    keys = [k for k in per[0] if all(k in d for d in per[1:])]
    vals = {k: float(np.mean([d[k] for d in per])) for k in keys}
    if f.get("control_set"):
        c = read_outcomes(res, model, "zeroshot", f["control_set"])
        if c is None:
            return None
        named = dict(zip(c["key"].tolist(), c["pred"].tolist()))
        target = dict(zip(outs[0]["key"].tolist(), outs[0]["attack_label"].tolist()))
        vals = {k: v - float(named[k] == target[k]) for k, v in vals.items() if k in named}
    return vals


def _paired(run: Path, f: dict) -> dict | None:
    """The treatment's and the control's outcomes on the items both were scored on (matched by key)."""
    t = _item_values(run / "results", f["treatment"], f)
    c = _item_values(run / "results", f["control"], f)
    if t is None or c is None:
        return None
    common = [k for k in t if k in c]
    if not common:
        raise ValueError("treatment and control were evaluated on no common items")
    tv, cv = np.array([t[k] for k in common]), np.array([c[k] for k in common])
    keep = ~(np.isnan(tv) | np.isnan(cv))
    return {"treatment": tv[keep], "control": cv[keep]}


def _text_share(run: Path, f: dict) -> dict | None:
    """Per pool sample: has text (the profile's OCR, as the subset's funnel reports it) and in the subset."""
    from .pool import Pool, read_subset, subset_contains

    if not (run / "pool").is_dir():
        return None
    pool = Pool(run / "pool")
    sub = pool.subset_path(f["treatment"])
    if not sub.exists() or not pool.done_shards("spot"):
        return None
    df = pool.load("spot", columns=["has_text"])
    has = df["has_text"].astype(float).to_numpy()
    inside = subset_contains(read_subset(sub), df["uid"].tolist()).astype(float)
    ok = ~np.isnan(has)  # images the OCR failed on are in neither share
    return {"has_text": has[ok], "in_subset": inside[ok]}


def text_share_difference(g: dict) -> float:
    """Share of text-bearing images in the subset minus in the whole pool."""
    inside = g["in_subset"] > 0
    return float(g["has_text"][inside].mean() - g["has_text"].mean()) if inside.any() else float("nan")


def _kept(run: Path, p: "Protocol", f: dict) -> dict | None:
    """Per pool sample: in the treatment model's subset, in the control model's (their recipes' subsets)."""
    from .pool import Pool, read_subset, subset_contains

    if not (run / "pool").is_dir():
        return None
    pool = Pool(run / "pool")
    subs = [pool.subset_path(p.models[f[r]]["subset"]) for r in ("treatment", "control")]
    if not all(x.exists() for x in subs) or not pool.done_shards("spot"):
        return None
    uids = pool.load("spot", columns=["has_text"])["uid"].tolist()  # every profiled pool sample
    t, c = (subset_contains(read_subset(x), uids).astype(float) for x in subs)
    return {"treatment": t, "control": c}


def kept_ratio_statistic(ratio: float):
    """Samples the treatment's subset keeps over the control's, minus the claimed `ratio` (a "+" claim
    with margin 0 then says "keeps at least ratio x as many")."""

    def stat(g: dict) -> float:
        kept = g["control"].sum()
        return float(g["treatment"].sum() / kept - ratio) if kept else float("nan")

    return stat


def _er(run: Path, p: Protocol, f: dict) -> dict | None:
    """Per evaluation image: correct or not for the treatment and every family point on the ID set and the
    finding's shifts (columns `t:<set>` and `<point>:<set>`), aligned by image key across sets (the
    shifted sets show the same scenes as the clean set)."""
    from .evaluate.results import read_outcomes

    res = run / "er" / "results"
    info = run / "er" / "points.json"
    if not info.exists():
        return None
    points = json.loads(info.read_text())["family_points"]
    sets = [p.er["id_set"], *f["shifts"]]
    cols, arrays, keys = [], [], None
    for m in [f["treatment"], *points]:
        for s in sets:
            o = read_outcomes(res, m, "zeroshot", s)
            if o is None:
                return None
            d = dict(zip(o["key"].tolist(), (o["pred"] == o["label"]).astype(float)))
            keys = sorted(d) if keys is None else [x for x in keys if x in d]
            cols.append(("t" if m == f["treatment"] else m, s))
            arrays.append(d)
    C = np.array([[a[k] for a in arrays] for k in keys])
    return {"C": C, "cols": cols, "link": p.er.get("link", "logit")}


def er_statistic(cols: list, link: str, id_set: str, shifts: list):
    """ER of the treatment (columns `t:*`) against the family's line, mean over `shifts`."""
    from .evaluate.metrics import effective_robustness, fit_trend

    t_idx = {s: i for i, (m, s) in enumerate(cols) if m == "t"}
    fam = sorted({m for m, _ in cols if m != "t"})
    f_idx = {(m, s): i for i, (m, s) in enumerate(cols) if m != "t"}

    def stat(g: dict) -> float:
        acc = g["C"].mean(0)
        ers = []
        for o in shifts:
            xs = [acc[f_idx[(m, id_set)]] for m in fam]
            ys = [acc[f_idx[(m, o)]] for m in fam]
            a, b = fit_trend(xs, ys, link)
            ers.append(effective_robustness(acc[t_idx[id_set]], acc[t_idx[o]], a, b, link))
        return float(np.mean(ers))

    return stat


def finding_groups(runs: list[Path], p: Protocol, f: dict) -> tuple[list[dict], list[str]]:
    """One group of per-item arrays per run that measured the finding, and the runs that did."""
    groups, used = [], []
    for r in runs:
        r = Path(r)
        if f["metric"] == "er":
            g = _er(r, p, f)
        elif f["metric"] == "text_share":
            g = _text_share(r, f)
        elif f["metric"] == "kept_ratio":
            g = _kept(r, p, f)
        else:
            g = _paired(r, f)
        if g is not None:
            groups.append(g)
            used.append(str(r))
    return groups, used


def verdicts(runs: list[str | os.PathLike], p: Protocol) -> list[dict]:
    """Every finding of the protocol on these runs (one per seed): verdict, interval, per-seed estimates."""
    v = p.verdict
    out = []
    for f in p.findings:
        base = {k: f.get(k) for k in ("id", "finding", "paper", "metric", "treatment", "control")}
        base.update({k: f[k] for k in ("ratio", "control_set") if k in f})
        groups, used = finding_groups([Path(r) for r in runs], p, f)
        if not groups:
            out.append({**base, "verdict": "not run", "text": "not measured at this size / in these runs"})
            continue
        if f["metric"] == "er":
            cols_sets = [tuple(g["cols"]) for g in groups]
            if len(set(cols_sets)) != 1:
                raise ValueError(f"finding {f['id']}: the runs have different ER families; pool runs of one protocol")
            stat = er_statistic(groups[0]["cols"], groups[0]["link"], p.er["id_set"], f["shifts"])
            groups = [{"C": g["C"]} for g in groups]
        elif f["metric"] == "text_share":
            stat = text_share_difference
        elif f["metric"] == "kept_ratio":
            stat = kept_ratio_statistic(float(f["ratio"]))
        else:
            stat = mean_difference
        iv = bootstrap(groups, stat, int(v["n_boot"]), float(v["confidence"]), int(v["boot_seed"]))
        j = judge(iv, p.claim(f))
        out.append({**base, **j.as_dict(), "runs": used})
    return out


def verdict_lines(vs: list[dict]) -> list[str]:
    """One printed line per finding: [verdict] id: finding -- estimate [CI] (...)."""
    lines = []
    for x in vs:
        who = {
            "er": f"ER of {x['treatment']} vs the family's line",
            "text_share": f"{x['treatment']} subset - pool",
            "kept_ratio": f"{x['treatment']} kept / {x.get('control')} kept - {x.get('ratio')}",
        }
        who = who.get(x["metric"], f"{x['treatment']} - {x.get('control')}")
        if x.get("control_set"):
            who += f", each net of {x['control_set']}"
        lines.append(f"  [{x['verdict']}] {x['id']} ({x['metric']}, {who}): {x['finding']}\n      {x['text']}")
    return lines
