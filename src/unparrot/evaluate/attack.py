"""`unparrot attack`: a typographically attacked copy of a labelled set (Less is More's ImageNet-Attr).

mode="attr": on each image, the name of the class that a reference model most often confuses with the
true class (from its confusion matrix on the clean set; for a class it never confuses, the most similar
class by text-embedding similarity) is written in red, at a fixed place near the top-left, with a font
size relative to the image. Labels are unchanged; `.json` records `attack_label` and `attack_text`.
mode="random": a random wrong class, in a random font, size, colour and position (seeded).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dataclasses import dataclass

from ..flags import option
from ..imaging import typography
from ..imaging.decode import DecodeError, open_image
from .datasets import load_set, write_set
from .metrics import confusion_matrix

FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono-Bold.ttf")


def confused_classes(labels, preds, class_emb: np.ndarray) -> np.ndarray:
    """For each class, the wrong class predicted most often; a class never confused gets the class whose
    text embedding is most similar to its own."""
    n = len(class_emb)
    cm = confusion_matrix(preds, labels, n)
    np.fill_diagonal(cm, -1)
    sim = class_emb @ class_emb.T
    np.fill_diagonal(sim, -np.inf)
    return np.where(cm.max(1) > 0, cm.argmax(1), sim.argmax(1))


def write_word(
    im, word: str, size_frac: float, xy=(0.04, 0.04), color=(220, 20, 20), font: str = FONTS[0], angle: float = 0.0
):
    """`word` on a copy of PIL image `im`: font = size_frac x the short side, fitted to the width."""
    im = im.copy()
    W, H = im.size
    size = typography.fit_font_size(word, font, max(6, int(size_frac * min(W, H))), 0.92 * W - xy[0] * W, 0.9 * H)
    typography.draw_text(im, word, font, size, xy[0] * W, xy[1] * H, tuple(color), angle)
    return im


@dataclass
class AttackConfig:
    """The options of `build_attack()` (its signature defaults read these; the CLI's flags too)."""

    src: str = option(help="labelled set folder", positional=True)
    out: str = option(help="output folder", positional=True)
    mode: str = option("attr", "attr or random")
    model: str | None = option(None, "reference model for attr")
    pretrained: str | None = option(None, "reference checkpoint")
    size_frac: float = option(0.25, "font size / short side of the image", aliases=("--size",))
    color: tuple = option((220, 20, 20), "RGB colour of the word (attr)")
    seed: int = option(0, "seed of the random choices")


def build_attack(
    src: str | os.PathLike,
    out: str | os.PathLike,
    mode: str = AttackConfig.mode,
    model: str | None = AttackConfig.model,
    pretrained: str | None = AttackConfig.pretrained,
    size_frac: float = AttackConfig.size_frac,
    color=AttackConfig.color,
    seed: int = AttackConfig.seed,
) -> dict:
    """Write an attacked copy of the labelled set `src` to `out` (same layout). `attr` needs a reference
    model (`model`, `pretrained`); `random` needs none."""
    if mode not in ("attr", "random"):
        raise ValueError("mode is attr (ImageNet-Attr) or random")
    ds = load_set(src)
    n = len(ds.classnames)
    if n < 2:
        raise ValueError("an attack needs at least 2 classes")
    target = None
    if mode == "attr":
        if not model:
            raise ValueError("mode attr needs a reference model (--model, --pretrained)")
        from ..models import load_clip
        from .zeroshot import predictions

        labels, preds, W = predictions(load_clip(model, pretrained), ds)
        target = confused_classes(labels, preds, W)
    rng = np.random.default_rng(seed)

    def rows():
        for r in ds.samples():
            if r["label"] is None:
                continue
            try:
                im = open_image(r["image"])
            except DecodeError:
                continue
            y = int(r["label"])
            if mode == "attr":
                t = int(target[y])
                im2 = write_word(im, ds.classnames[t], size_frac, color=color)
                info = {"attack_label": t, "attack_text": ds.classnames[t], "mode": "attr"}
            else:
                t = int((y + 1 + rng.integers(n - 1)) % n)
                frac = float(rng.uniform(0.6, 1.4) * size_frac)
                xy = (float(rng.uniform(0.02, 0.5)), float(rng.uniform(0.02, 0.7)))
                col = tuple(int(c) for c in rng.integers(0, 256, 3))
                font = str(rng.choice(FONTS))
                im2 = write_word(im, ds.classnames[t], frac, xy, col, font, float(rng.uniform(-20, 20)))
                info = {
                    "attack_label": t,
                    "attack_text": ds.classnames[t],
                    "mode": "random",
                    "font": font,
                    "color": list(col),
                }
            yield {"key": r["key"], "image": im2, "label": y, "meta": {**(r["meta"] or {}), **info}}

    count = write_set(out, rows(), ds.classnames, ds.templates)
    result = {"source": str(src), "out": str(out), "mode": mode, "images": count}
    if target is not None:
        result["targets"] = {ds.classnames[i]: ds.classnames[int(t)] for i, t in enumerate(target)}
    Path(out, "attack.json").write_text(json.dumps(result, indent=1))
    return result
