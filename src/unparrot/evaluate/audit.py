"""`unparrot audit`: the text-bias card of any open_clip checkpoint (does the model read instead of see?).

Four measurements (pure functions in `audit_metrics`, each with a seeded 95% bootstrap interval):
1. Sync score (Parrot captions): each vocabulary word rendered on plain backgrounds in several fonts,
   colour styles and positions; cosine of the rendering with the word's text embedding (mean and std, as
   the paper's table), and the matched - mismatched gap over several derangements (ours).
2. Typographic attack (ImageNet-Attr style): each image of a labelled set with a wrong class name in red
   near the top-left, and, at the same place, in the same size and colour, a control word that is no class.
3. Word reading: zero-shot top-1 among the vocabulary on the renderings of (1).
4. Text reliance on a pool (optional): CLIP score of text-bearing pairs with and without their text boxes
   masked (T-MARS's mean fill, boxes from the spot stage), and the share of pairs the text carries.

The card is `OUT/<name>/card.json` (a list of CLIP_benchmark-shaped results, one per measurement, which
`unparrot results OUT` tabulates) and `OUT/<name>/card.html`; several models also get `OUT/comparison.html`.
All inputs are checked before a model is loaded; checkpoints load with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..flags import option
from . import audit_metrics as am

SYNC_FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")  # open licence (matplotlib ships them)
POSITIONS = {"middle": (0.5, 0.5), "upper": (0.5, 0.25), "lower": (0.5, 0.75)}
ATTACK_COLOR = (220, 20, 20)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


@dataclass
class AuditConfig:
    """Everything that defines an audit; every default lives here (the CLI's flags are made from it)."""

    # checkpoint files, or model names (random weights)
    models: list = option([], "checkpoint files (or model names, for random weights)", positional=True, nargs="+")
    # architecture of checkpoints that do not record their own
    model: str | None = option(
        None, "architecture of checkpoint files that do not record it (unparrot train's checkpoints do)"
    )
    out: str = option(
        "cards", "folder of cards: OUT/<name>/card.json and card.html, OUT/comparison.html for several models"
    )
    # card name (one model only); default: the run folder or file name
    name: str | None = option(None, "card name for a single model (default: its run folder or file name)")
    # vocab CSV, a pool's vocab folder, or one word per line; default built-in
    vocab: str | None = option(
        None, "words: a vocab CSV (unparrot vocab), a pool's vocab folder or one word per line (default: built-in)"
    )
    # most frequent words of the vocabulary file
    vocab_top: int = option(200, "most frequent words taken from the vocabulary file")
    # labelled set (webdataset + classnames.txt, or class folders); default built-in
    labelled: str | None = option(
        None, "labelled set for the attack: webdataset with classnames.txt, or class folders (default: built-in)"
    )
    # zero-shot templates: openai, simple, plain or a file (default: the set's)
    templates: str | None = option(
        None, "zero-shot templates: openai, simple, plain or a file (default: the set's own)"
    )
    # a pool with a spot stage: measure text reliance on it
    pool: str | None = option(None, "a pool with a spot stage: CLIP score with and without its text masked")
    # text-bearing pairs of the pool to score
    pool_samples: int = option(500, "text-bearing pairs of the pool to score")
    # renderings per word (colour styles vary fastest, then positions and fonts)
    renders: int = option(4, "renderings per vocabulary word")
    fonts: list = field(
        default_factory=lambda: list(SYNC_FONTS),
        metadata={"help": "fonts of the renderings (DejaVu names or .ttf paths)", "nargs": "+"},
    )
    # font px / canvas side (the Parrot paper: 32 px on 224)
    font_scale: float = option(32 / 224, "rendered font size / canvas side")
    # mismatched pairings of the vocabulary for the Sync gap
    derangements: int = option(5, "mismatched pairings of the vocabulary for the Sync gap")
    # attack font size / the image's short side
    attack_size: float = option(0.3, "attack word size / the image's short side")
    # random (seeded: the same images for every model) or confused (ImageNet-Attr)
    attack_target: str = option(
        "random", "random (seeded wrong class, same for every model) or confused (the model's own confusions)"
    )
    # images of the labelled set (a seeded subset by key when larger)
    max_images: int = option(500, "images of the labelled set (a seeded subset when larger)")
    # images per class of the built-in synthetic set
    builtin_per_class: int = option(20, "images per class of the built-in synthetic set")
    # text reliance: share of the score margin the text must carry
    carried_fraction: float = option(
        0.5, "a pair is carried by its text when masking takes this share of its score margin"
    )
    # bootstrap resamples per interval
    bootstrap: int = option(1000, "bootstrap resamples per 95 percent interval")
    seed: int = option(0, "seed of every random choice and of the bootstrap")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    batch_size: int = option(64, "images per forward pass")
    # threads drawing and transforming images (more for a fast GPU)
    workers: int = option(1, "threads that draw and transform images")
    progress: bool = option(True, "")

    def validate(self) -> "AuditConfig":
        errs = []
        if not self.models:
            errs.append("no model to audit (a checkpoint file or a model name)")
        if self.name and len(self.models) > 1:
            errs.append("name is for a single model; several models are named by their files")
        for k in (
            "vocab_top",
            "pool_samples",
            "renders",
            "derangements",
            "max_images",
            "builtin_per_class",
            "bootstrap",
            "batch_size",
            "workers",
        ):
            if getattr(self, k) < 1:
                errs.append(f"{k} must be >= 1")
        if not 0 < self.font_scale <= 1 or not 0 < self.attack_size <= 1:
            errs.append("font_scale and attack_size must be in (0, 1]")
        if not 0 < self.carried_fraction < 1:
            errs.append("carried_fraction must be in (0, 1)")
        if self.attack_target not in ("random", "confused"):
            errs.append("attack_target is random or confused")
        if not self.fonts:
            errs.append("fonts: at least one")
        if errs:
            raise ValueError("bad audit config: " + "; ".join(errs))
        from ..imaging.typography import get_font

        for f in self.fonts:
            try:
                get_font(f, 12)
            except OSError:
                raise ValueError(f"font {f!r} not found (DejaVu fonts ship with matplotlib; or a .ttf path)") from None
        return self


# ---- inputs ---------------------------------------------------------------------------------------
def _latin(word: str) -> bool:
    """Printable ASCII, Latin-1 signs, Latin letters and combining accents: what the open Latin fonts draw
    (anything else would render as empty boxes and measure nothing)."""
    for ch in word:
        if 32 <= ord(ch) < 127 or (0xA0 <= ord(ch) <= 0xFF and not unicodedata.category(ch).startswith("C")):
            continue
        if unicodedata.category(ch) == "Mn" or "LATIN" in unicodedata.name(ch, ""):
            continue
        return False
    return True


def load_vocabulary(path: str | os.PathLike | None = None, top: int = 200) -> list[str]:
    """The audit's words: a vocab CSV (first column, most frequent first), a folder holding `unparrot vocab`'s
    co_emb_1gram.csv, one word per line, or (None) the synthetic world's built-in word list. Empty or
    non-Latin words are an error naming them (the renderer's open fonts are Latin fonts)."""
    if path is None:
        from ..synth.world import vocabulary

        return list(vocabulary())[:top]
    p = Path(path)
    if p.is_dir():
        p = p / "co_emb_1gram.csv" if (p / "co_emb_1gram.csv").exists() else p / "vocab" / "co_emb_1gram.csv"
        if not p.exists():
            raise FileNotFoundError(f"{path}: no co_emb_1gram.csv (run `unparrot vocab POOL` first)")
    if not p.exists():
        raise FileNotFoundError(f"vocabulary {path} not found")
    if p.suffix.lower() in (".csv", ".tsv"):
        import csv

        with open(p, newline="", encoding="utf-8") as f:
            table = list(csv.reader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ","))

        def header(r):  # "ngram,count" (unparrot vocab) or any first row whose count is not a number
            return r and (r[0] == "ngram" or (len(r) > 1 and not r[1].strip().replace(".", "", 1).isdigit()))

        rows = [(i + 1, r[0] if r else "") for i, r in enumerate(table) if not (i == 0 and header(r))]
    else:
        rows = [(i + 1, ln) for i, ln in enumerate(p.read_text(encoding="utf-8").splitlines()) if ln != ""]
    bad = [(n, w) for n, w in rows if not w.strip() or not _latin(w)]
    if bad:
        shown = ", ".join(f"line {n}: {w!r}" for n, w in bad[:3])
        raise ValueError(f"{path}: {len(bad)} empty or non-Latin words ({shown}); give Latin-script words")
    words = list(dict.fromkeys(w.strip() for _, w in rows))[:top]
    if len(words) < 2:
        raise ValueError(f"{path}: the audit needs at least 2 distinct words, found {len(words)}")
    return words


@dataclass
class AuditSet:
    """A labelled set as the audit uses it: images (bytes or PIL), labels, class names and templates."""

    name: str
    classnames: list[str]
    templates: list[str]
    keys: list[str]
    images: list
    labels: np.ndarray


def builtin_set(per_class: int = 20, seed: int = 0) -> AuditSet:
    """The synthetic world's clean evaluation images (10 shapes, 64 px, `learnable` preset), drawn in
    memory and seeded: a set every model is audited on identically without a download."""
    from ..synth.world import ZEROSHOT_TEMPLATES, make_config, make_eval_sample

    cfg = make_config("learnable")
    keys, images, labels = [], [], []
    for label in range(len(cfg.classes)):
        for j in range(per_class):
            img, _ = make_eval_sample(cfg, np.random.default_rng([seed, 2, label, j]), label, "clean")
            keys.append(f"s{label:03d}_{j:05d}")
            images.append(img)
            labels.append(label)
    return AuditSet("builtin-synthetic", list(cfg.classes), list(ZEROSHOT_TEMPLATES), keys, images, np.array(labels))


def _key_rank(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode()).digest()[:8], "big")


def labelled_set(path: str, templates: str | None = None, max_images: int = 500, seed: int = 0) -> AuditSet:
    """A user's labelled set, or a seeded subset of `max_images` of it chosen by key (so the same images
    for every model, whatever the order of the files), holding only those images in memory."""
    from .datasets import load_set

    ds = load_set(path, templates=templates)
    if not ds.classnames:
        raise ValueError(f"{path}: no class names (classnames.txt beside the shards, or one folder per class)")
    if len(ds.classnames) < 2:
        raise ValueError(f"{path}: the attack needs at least 2 classes")
    heap: list = []
    for r in ds.samples():
        if r["label"] is None or r.get("problem"):
            continue
        item = (-_key_rank(r["key"], seed), r["key"], r["image"], int(r["label"]))
        if len(heap) < max_images:
            heapq.heappush(heap, item)
        elif item[0] > heap[0][0]:
            heapq.heapreplace(heap, item)
    if not heap:
        raise ValueError(f"{path}: no labelled images")
    rows = sorted(heap, key=lambda t: t[1])
    return AuditSet(
        ds.name, ds.classnames, ds.templates, [r[1] for r in rows], [r[2] for r in rows], np.array([r[3] for r in rows])
    )


@dataclass
class ModelSpec:
    name: str
    arch: str
    checkpoint: str | None


def _checkpoint_arch(path: str) -> str | None:
    """Check a checkpoint file (weights_only: no code runs) and return the architecture it records."""
    import pickle

    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a loadable torch checkpoint ({first})") from None
    sd = ck.get("state_dict", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a state dict (tensor names to tensors, or such a mapping under 'state_dict')")
    name = ck.get("name") if isinstance(ck.get("name"), str) else None
    return name


def resolve_models(cfg: AuditConfig) -> list[ModelSpec]:
    """Each item of `cfg.models` as (card name, architecture, checkpoint): a file is checked and its
    architecture read from it (unparrot train records it) or from `cfg.model`; a name is random weights."""
    from ..models import model_config

    specs, used = [], set()
    for item in cfg.models:
        item = str(item)
        if os.path.isfile(item):
            recorded, arch = _checkpoint_arch(item), cfg.model
            if recorded:  # unparrot train records the architecture; open_clip's trainer records a run name
                try:
                    model_config(recorded)
                    arch = recorded
                except KeyError:
                    pass
            if arch is None:
                raise ValueError(f"{item}: the checkpoint does not name a known architecture; pass --model ARCH")
            p = Path(item)
            base = p.parent.parent.name if p.parent.name == "checkpoints" else p.stem
            ckpt = item
        elif item.endswith(CHECKPOINT_SUFFIXES) or os.sep in item:
            raise FileNotFoundError(f"checkpoint {item} not found")
        else:
            arch, ckpt, base = item, None, f"{item}-random"
        model_config(arch)  # an unknown architecture is a one-line error before anything loads
        name = cfg.name or base
        for i in itertools.count(2):
            if name not in used:
                break
            name = f"{base}-{i}"
        used.add(name)
        specs.append(ModelSpec(name, arch, ckpt))
    return specs


def _pool_pairs(pool_path: str, n: int, seed: int) -> dict:
    """Up to `n` text-bearing pairs of a profiled pool (a seeded choice by uid): image bytes, caption, boxes;
    plus the pool's share of text-bearing images."""
    from ..pool import Pool

    pool = Pool(pool_path)
    if not pool.done_shards("spot"):
        raise ValueError(f"{pool_path}: no spot stage; run `unparrot profile {pool_path}` first")
    df = pool.load("spot", columns=["has_text", "boxes"])
    has = df["has_text"].fillna(False).astype(bool).to_numpy()
    text = df[has]
    chosen = sorted(text["uid"].tolist(), key=lambda u: _key_rank(u, seed))[:n]
    want = set(chosen)
    boxes = dict(zip(text["uid"], text["boxes"]))
    images, captions, quads, uids = [], [], [], []
    for row in pool.samples():
        if row["uid"] in want and row["image"] is not None and row["caption"]:
            uids.append(row["uid"])
            images.append(row["image"])
            captions.append(row["caption"])
            quads.append([list(map(list, q)) for q in boxes[row["uid"]]])
            want.discard(row["uid"])
    if len(uids) < 2:
        raise ValueError(f"{pool_path}: fewer than 2 text-bearing pairs with captions to score")
    return {
        "uids": uids,
        "images": images,
        "captions": captions,
        "boxes": quads,
        "share_with_text": float(has.mean()) if len(has) else 0.0,
        "pool_rows": int(len(has)),
    }


# ---- one model ------------------------------------------------------------------------------------
def _renders(words: list[str], cfg: AuditConfig):
    """(word index, font, style, position) of every rendering: word i takes combinations i*r .. i*r+r-1 of
    fonts x positions x styles (styles fastest), so each word is seen in several colour styles and, across
    the vocabulary, every font and position is used about equally."""
    from .sync import STYLES

    combos = list(itertools.product(cfg.fonts, POSITIONS, STYLES))
    out = []
    for i in range(len(words)):
        for j in range(cfg.renders):
            font, pos, style = combos[(i * cfg.renders + j) % len(combos)]
            out.append((i, font, style, pos))
    return out


def _render(words, spec, canvas, font_px):
    from .sync import render_word

    i, font, style, pos = spec
    return render_word(words[i], style, canvas, font_px, font, POSITIONS[pos])


def audit_model(spec: ModelSpec, cfg: AuditConfig, words: list[str], ds: AuditSet, pool: dict | None) -> dict:
    """Audit one model: returns {"records": card results, "media": images and arrays for the HTML card,
    "timing": seconds and images per part}."""
    import torch

    from ..imaging.decode import open_image
    from ..models import load_clip
    from .attack import confused_classes, write_word
    from .zeroshot import class_embeddings, encode_images, encode_texts

    t_start = time.time()
    with torch.random.fork_rng(devices=[]):  # random weights (no checkpoint) are seeded: a card reproduces
        torch.manual_seed(cfg.seed)
        clip = load_clip(spec.arch, spec.checkpoint, device=cfg.device)
    t_load = time.time() - t_start
    canvas = clip.image_size
    font_px = max(4, round(cfg.font_scale * canvas))
    enc = dict(batch=cfg.batch_size, workers=cfg.workers)
    timing = {"load_s": round(t_load, 2)}

    # 1 + 3: Sync score and word reading on the same renderings
    t0 = time.time()
    specs = _renders(words, cfg)
    T = encode_texts(clip, words)
    I, _ = encode_images(clip, [lambda s=s: _render(words, s, canvas, font_px) for s in specs], **enc)
    word_of = np.array([s[0] for s in specs])
    perms = am.derangements(len(words), cfg.derangements, cfg.seed)
    sync = am.sync_measures(I, T, word_of, perms, cfg.bootstrap, cfg.seed)
    matched = (I * T[word_of]).sum(1)
    sync["per_style"] = {
        st: float(matched[[s[2] == st for s in specs]].mean()) for st in dict.fromkeys(s[2] for s in specs)
    }
    sync["per_font"] = {
        f: float(matched[[s[1] == f for s in specs]].mean()) for f in dict.fromkeys(s[1] for s in specs)
    }
    sync["font_px"], sync["canvas"] = font_px, canvas
    reading, margin = am.word_reading(I, T, word_of, cfg.bootstrap, cfg.seed)
    hit = (I @ T.T).argmax(1) == word_of
    reading["per_style"] = {
        st: float(hit[[s[2] == st for s in specs]].mean()) for st in dict.fromkeys(s[2] for s in specs)
    }
    timing["words_s"], timing["words_images"] = round(time.time() - t0, 2), len(specs)
    word_margin = np.bincount(word_of, weights=margin, minlength=len(words)) / np.bincount(word_of)
    best = np.argsort(-word_margin, kind="stable")[:12]
    best_read = [
        (
            _render(words, next(s for s in specs if s[0] == i), canvas, font_px),
            words[i],
            float(word_margin[i]),
            float(hit[word_of == i].mean()),
        )
        for i in best
    ]
    mism = np.stack([(I * T[p[word_of]]).sum(1) for p in perms], 1).mean(1)

    # 2: typographic attack
    t0 = time.time()

    def pil(im):
        return open_image(im, draft=canvas * 2) if isinstance(im, (bytes, bytearray)) else im

    W = class_embeddings(clip, ds.classnames, ds.templates)
    clean_feats, ok = encode_images(clip, [lambda im=im: pil(im) for im in ds.images], **enc)
    keep = np.flatnonzero(ok)
    labels = ds.labels[keep]
    clean_pred = (clean_feats @ W.T).argmax(1)
    n = len(ds.classnames)
    rng = np.random.default_rng([cfg.seed, 7])
    if cfg.attack_target == "confused":
        target = confused_classes(labels, clean_pred, W)[labels]
    else:
        target = (labels + 1 + rng.integers(0, n - 1, len(labels))) % n
    lower = {c.lower() for c in ds.classnames}
    controls = [w for w in words if w.lower() not in lower]
    if not controls:
        from ..synth.world import vocabulary

        controls = [w for w in vocabulary() if w.lower() not in lower]
    control = [controls[i] for i in rng.integers(0, len(controls), len(labels))]
    size = cfg.attack_size

    def attacked(i):
        return write_word(pil(ds.images[keep[i]]), ds.classnames[target[i]], size, color=ATTACK_COLOR)

    def controlled(i):
        return write_word(pil(ds.images[keep[i]]), control[i], size, color=ATTACK_COLOR)

    items = [lambda i=i: attacked(i) for i in range(len(keep))] + [lambda i=i: controlled(i) for i in range(len(keep))]
    F, _ = encode_images(clip, items, **enc)
    preds = (F @ W.T).argmax(1)
    att_pred, ctl_pred = preds[: len(keep)], preds[len(keep) :]
    attack = am.attack_measures(labels, clean_pred, att_pred, ctl_pred, target, n, cfg.bootstrap, cfg.seed)
    attack["undecodable"] = int((~ok).sum())
    attack["attack_target"] = cfg.attack_target
    timing["attack_s"], timing["attack_images"] = round(time.time() - t0, 2), int(len(ds.images) + 2 * len(keep))
    flips = am.flipped(labels, clean_pred, att_pred, target)[:12]
    flipped_cells = [
        (pil(ds.images[keep[i]]), attacked(i), ds.classnames[labels[i]], ds.classnames[target[i]]) for i in flips
    ]

    # 4: text reliance on a pool
    reliance, reliance_media = None, None
    if pool is not None:
        t0 = time.time()
        from ..imaging.mask import Masker

        masker = Masker()

        def masked(i):
            return masker.mask_pil(open_image(pool["images"][i], draft=None), pool["boxes"][i])

        npairs = len(pool["images"])
        Ti = encode_texts(clip, pool["captions"])
        Ii, ok1 = encode_images(clip, [lambda i=i: pil(pool["images"][i]) for i in range(npairs)], **enc)
        Im, ok2 = encode_images(clip, [lambda i=i: masked(i) for i in range(npairs)], **enc)
        if not (ok1.all() and ok2.all()):
            good = ok1 & ok2
            Ii, Im = Ii[good[ok1]], Im[good[ok2]]
            Ti = Ti[good]
        s, sm = (Ii * Ti).sum(1), (Im * Ti).sum(1)
        sx = (Ii * Ti[am.derangements(len(Ti), 1, cfg.seed)[0]]).sum(1)
        reliance = am.text_reliance(s, sm, sx, cfg.carried_fraction, cfg.bootstrap, cfg.seed)
        reliance["share_with_text_pool"] = pool["share_with_text"]
        reliance["carried_share_of_pool"] = reliance["carried_share"] * pool["share_with_text"]
        reliance["undecodable"] = int(npairs - len(s))
        timing["pool_s"], timing["pool_images"] = round(time.time() - t0, 2), 2 * npairs
        reliance_media = {"score": s, "masked": sm, "baseline": float(sx.mean())}

    timing["total_s"] = round(time.time() - t_start, 2)
    images = sum(v for k, v in timing.items() if k.endswith("_images"))
    timing["images"] = images
    timing["images_per_s"] = round(images / max(1e-9, timing["total_s"] - t_load), 2)
    settings = {
        "renders": cfg.renders,
        "fonts": list(cfg.fonts),
        "font_scale": cfg.font_scale,
        "styles": sorted(set(s[2] for s in specs)),
        "positions": list(POSITIONS),
        "derangements": cfg.derangements,
        "attack_size": cfg.attack_size,
        "attack_target": cfg.attack_target,
        "bootstrap": cfg.bootstrap,
        "seed": cfg.seed,
        "interval": "95% percentile bootstrap",
        "device": cfg.device,
    }
    base = {
        "model": spec.name,
        "pretrained": spec.checkpoint,
        "language": "en",
        "architecture": spec.arch,
        "audit": settings,
    }
    records = [
        {**base, "dataset": "rendered-vocab", "task": "sync", "metrics": sync},
        {**base, "dataset": ds.name, "task": "typographic_attack", "metrics": attack},
        {**base, "dataset": "rendered-vocab", "task": "word_reading", "metrics": reading},
    ]
    if reliance is not None:
        records.append({**base, "dataset": Path(cfg.pool).name, "task": "text_reliance", "metrics": reliance})
    records[0]["timing"] = timing
    media = {
        "matched": matched,
        "mismatched": mism,
        "best_read": best_read,
        "flipped": flipped_cells,
        "reliance": reliance_media,
        "sample_renders": [_render(words, s, canvas, font_px) for s in specs[:8]],
    }
    return {"records": records, "media": media, "timing": timing}


# ---- the command ----------------------------------------------------------------------------------
def audit(cfg: AuditConfig) -> list[dict]:
    """Audit every model of `cfg` and write the cards (and the comparison page for several). Every input is
    checked first, so a bad vocabulary, set, pool or checkpoint stops the run before any model loads.
    Returns one summary per model: its name, card paths, headline numbers and timing."""
    from ..report.card import card_html, comparison_html
    from ..pool import atomic_write_bytes

    cfg.validate()
    words = load_vocabulary(cfg.vocab, cfg.vocab_top)
    ds = (
        labelled_set(cfg.labelled, cfg.templates, cfg.max_images, cfg.seed)
        if cfg.labelled
        else builtin_set(cfg.builtin_per_class, cfg.seed)
    )
    pool = _pool_pairs(cfg.pool, cfg.pool_samples, cfg.seed) if cfg.pool else None
    specs = resolve_models(cfg)
    out = Path(cfg.out)
    summaries, cards = [], []
    for spec in specs:
        r = audit_model(spec, cfg, words, ds, pool)
        d = out / spec.name
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(d / "card.json", json.dumps(r["records"], indent=1).encode())
        atomic_write_bytes(d / "card.html", card_html(r["records"], r["media"]).encode("utf-8"))
        cards.append(r["records"])
        s = summary(r["records"])
        s.update({"card": str(d / "card.html"), "json": str(d / "card.json"), "timing": r["timing"]})
        summaries.append(s)
        if cfg.progress:
            print(summary_line(s))
    if len(specs) > 1:
        page = out / "comparison.html"
        atomic_write_bytes(page, comparison_html(cards).encode("utf-8"))
        for s in summaries:
            s["comparison"] = str(page)
    return summaries


HEADLINE = (  # (task, metric, label) shown in summaries, the comparison page and docs/audit.md
    ("sync", "sync_mean", "Sync score"),
    ("sync", "sync_gap", "Sync gap"),
    ("word_reading", "read_top1", "word reading top-1"),
    ("typographic_attack", "clean_acc1", "clean acc1"),
    ("typographic_attack", "attacked_acc1", "attacked acc1"),
    ("typographic_attack", "control_acc1", "control acc1"),
    ("typographic_attack", "attack_success_rate", "attack success"),
    ("text_reliance", "carried_share", "text-carried share"),
)


def summary(records: list[dict]) -> dict:
    """Headline numbers of a card: label -> (value, [lo, hi])."""
    by = {r["task"]: r["metrics"] for r in records}
    out = {"model": records[0]["model"], "numbers": {}}
    for task, key, label in HEADLINE:
        if task in by and key in by[task]:
            out["numbers"][label] = (by[task][key], by[task].get(f"{key}_ci95"))
    return out


def summary_line(s: dict) -> str:
    nums = "  ".join(f"{k} {v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" for k, (v, ci) in s["numbers"].items() if ci)
    t = s.get("timing", {})
    speed = f"{t.get('total_s', 0):.0f}s, {t.get('images_per_s', 0):.0f} img/s"
    return f"audit {s['model']}: {nums}  ({speed}) -> {s.get('card')}"
