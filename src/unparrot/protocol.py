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

METRICS = ("acc", "attack_success", "sync_gap", "text_share", "er")
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
    models: dict  # name -> {"subset": recipe name or YAML, "rewrites": bool, "train_args": extra `train` flags}
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
        m: {"subset": v["subset"], "rewrites": bool(v.get("rewrites", False)), "train_args": list(v.get("train_args", []))}
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
            for role in ("treatment", "control"):
                if f.get(role) not in p.models:
                    raise ValueError(f"{where}: {role} {f.get(role)!r} is not a model of the protocol")
            if f["metric"] == "acc" and not f.get("set"):
                raise ValueError(f"{where}: metric acc needs a set")


# ---- per-item data of one finding in one run ----------------------------------------------------------
def _aligned(a: dict, b: dict) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the items both outcome records have, by key (the same images, whatever the order)."""
    ka, kb = a["key"].tolist(), b["key"].tolist()
    if ka == kb:
        idx = np.arange(len(ka))
        return idx, idx
    pos = {k: i for i, k in enumerate(kb)}
    common = [(i, pos[k]) for i, k in enumerate(ka) if k in pos]
    if not common:
        raise ValueError("treatment and control were evaluated on no common items")
    ia, ib = zip(*common)
    return np.array(ia), np.array(ib)


def _per_item(o: dict, metric: str) -> np.ndarray:
    if metric == "acc":
        return (o["pred"] == o["label"]).astype(float)
    if metric == "attack_success":
        valid = o["attack_label"] >= 0
        return np.where(valid, (o["pred"] == o["attack_label"]).astype(float), np.nan)
    return (o["matched"] - o["mismatched"]).astype(float)  # sync_gap


def _paired(run: Path, f: dict) -> dict | None:
    from .evaluate.results import read_outcomes

    task, dataset = ("sync", "rendered-vocab") if f["metric"] == "sync_gap" else ("zeroshot", f.get("set", "attack"))
    t = read_outcomes(run / "results", f["treatment"], task, dataset)
    c = read_outcomes(run / "results", f["control"], task, dataset)
    if t is None or c is None:
        return None
    it, ic = _aligned(t, c)
    tv, cv = _per_item(t, f["metric"])[it], _per_item(c, f["metric"])[ic]
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
        who = {"er": f"ER of {x['treatment']} vs the family's line", "text_share": f"{x['treatment']} subset - pool"}
        who = who.get(x["metric"], f"{x['treatment']} - {x.get('control')}")
        lines.append(f"  [{x['verdict']}] {x['id']} ({x['metric']}, {who}): {x['finding']}\n      {x['text']}")
    return lines
