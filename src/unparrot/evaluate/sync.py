"""The Sync score (Parrot captions, docs/methods.md §1): how strongly a model matches a rendered word to that word.

Each vocabulary n-gram is rendered centred on a canvas in 4 styles (black on white, white on black,
white on gray, black on gray) with a 32 px font on 224 px (both scaled to the model's input size, or set
by `font_scale`); the score is the cosine of the rendering's image embedding and the n-gram's text
embedding, reported as mean and std per style and pooled. Raw cosines of small models trained from
scratch are not comparable across models, so we also report (ours) the gap matched - mismatched (the same
rendering scored against a different vocabulary n-gram, a seeded derangement) and read-top1 (the share of
renderings whose nearest vocabulary text is their own n-gram).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ..imaging.typography import fit_font_size, get_font
from .zeroshot import encode_images, encode_texts

STYLES = {
    "black_on_white": ((0, 0, 0), (255, 255, 255)),
    "white_on_black": ((255, 255, 255), (0, 0, 0)),
    "white_on_gray": ((255, 255, 255), (128, 128, 128)),
    "black_on_gray": ((0, 0, 0), (128, 128, 128)),
}


def render_word(
    text: str,
    style: str,
    canvas: int = 224,
    font_px: int = 32,
    font: str = "DejaVuSans.ttf",
    center: tuple[float, float] = (0.5, 0.5),
) -> Image.Image:
    """`text` centred on a canvas (Pillow's textbbox: the old textsize API is gone), shrunk to fit if needed.
    `center` (shares of the canvas) moves the ink box's centre elsewhere, kept inside the canvas (the audit
    renders several positions; the paper's Sync score uses the middle)."""
    fg, bg = STYLES[style]
    im = Image.new("RGB", (canvas, canvas), bg)
    size = fit_font_size(text, font, max(4, int(font_px)), canvas * 0.95, canvas * 0.95)
    f = get_font(font, size)
    d = ImageDraw.Draw(im)
    l, t, r, b = d.textbbox((0, 0), text, font=f)
    w, h = r - l, b - t
    x = min(max(center[0] * canvas - w / 2, 0), canvas - w)
    y = min(max(center[1] * canvas - h / 2, 0), canvas - h)
    d.text((x - l, y - t), text, font=f, fill=fg)
    return im


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A random permutation without fixed points: each word is scored against another word."""
    rng = np.random.default_rng(seed)
    if n < 2:
        raise ValueError("the mismatched Sync score needs at least 2 words")
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


def sync_score(
    clip,
    words: list[str],
    styles=tuple(STYLES),
    font_scale: float | None = None,
    font: str = "DejaVuSans.ttf",
    seed: int = 0,
    batch: int = 64,
    outcomes: dict | None = None,
) -> dict:
    """Sync score of `clip` over `words` (see the module docstring). `font_scale` = font px / canvas side
    (default 32/224). `outcomes`, a dict, receives the per-rendering cosines (key = style:word, matched,
    mismatched), so two models' gaps can be compared rendering by rendering."""
    words = list(dict.fromkeys(w for w in words if w and w.strip()))
    if len(words) < 2:
        raise ValueError("Sync score needs at least 2 distinct words")
    canvas = clip.image_size
    font_px = round((font_scale if font_scale else 32 / 224) * canvas)
    T = encode_texts(clip, words)
    perm = derangement(len(words), seed)
    out, pooled_m, pooled_x, read = {}, [], [], []
    for style in styles:
        if style not in STYLES:
            raise KeyError(f"unknown style {style!r}: {', '.join(STYLES)}")
        I, ok = encode_images(clip, [render_word(w, style, canvas, font_px, font) for w in words], batch)
        matched = (I * T).sum(1)
        mismatched = (I * T[perm]).sum(1)
        top1 = float(((I @ T.T).argmax(1) == np.arange(len(words))).mean())
        out[style] = {
            "mean": float(matched.mean()),
            "std": float(matched.std()),
            "mismatched_mean": float(mismatched.mean()),
            "gap": float(matched.mean() - mismatched.mean()),
            "read_top1": top1,
        }
        pooled_m.append(matched)
        pooled_x.append(mismatched)
        read.append(top1)
    m, x = np.concatenate(pooled_m), np.concatenate(pooled_x)
    if outcomes is not None:
        outcomes.update(key=np.array([f"{s}:{w}" for s in styles for w in words]), matched=m, mismatched=x)
    return {
        "sync_mean": float(m.mean()),
        "sync_std": float(m.std()),
        "mismatched_mean": float(x.mean()),
        "sync_gap": float(m.mean() - x.mean()),
        "read_top1": float(np.mean(read)),
        "n_words": len(words),
        "font_px": font_px,
        "canvas": canvas,
        "per_style": out,
    }
