"""Drawing primitives of the synthetic world: shapes as masks, backgrounds and paint. Text is drawn by
`unparrot.imaging.typography`, which the evaluation sets share, so a scene's words and an attack's words
come from the same code."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw

SS = 4  # supersampling factor for anti-aliased shape edges

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (235, 205, 40),
    "orange": (240, 130, 30),
    "purple": (130, 50, 170),
    "pink": (240, 120, 180),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "brown": (120, 75, 35),
    "cyan": (40, 200, 210),
}


# ---- shapes: polygons in unit coordinates ([-1, 1]^2, y down) or composite masks ----------------------
def _star(n=5, inner=0.45):
    pts = []
    for i in range(2 * n):
        r = 1.0 if i % 2 == 0 else inner
        a = -math.pi / 2 + i * math.pi / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _heart(n=60):
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -y / 17.0 + 0.1))
    return pts


_POLYGONS = {
    "box": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "star": _star(),
    "heart": _heart(),
    "cross": [
        (-0.3, -1),
        (0.3, -1),
        (0.3, -0.3),
        (1, -0.3),
        (1, 0.3),
        (0.3, 0.3),
        (0.3, 1),
        (-0.3, 1),
        (-0.3, 0.3),
        (-1, 0.3),
        (-1, -0.3),
        (-0.3, -0.3),
    ],
    "arrow": [(-1, -0.28), (0.2, -0.28), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.28), (-1, 0.28)],
    "kite": [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)],
    "bolt": [(0.15, -1), (-0.6, 0.1), (-0.05, 0.1), (-0.25, 1), (0.6, -0.2), (0.05, -0.2), (0.3, -1)],
}
SHAPES = ("disk", "box", "star", "heart", "cross", "ring", "arrow", "moon", "kite", "bolt")


def shape_mask(
    shape: str, size: int, cx: float, cy: float, radius: float, angle: float, outline: int = 0
) -> Image.Image:
    """An anti-aliased L-mode mask of `shape` centred at (cx, cy) with half-extent `radius`, rotated by
    `angle` degrees. `outline` > 0 draws only the contour with that line width (sketch style)."""
    ss = SS if size <= 128 else 2  # big images need less supersampling for smooth edges
    S = size * ss
    m = Image.new("L", (S, S), 0)
    d = ImageDraw.Draw(m)
    cx, cy, r = cx * ss, cy * ss, radius * ss
    lw = max(1, int(outline * ss))

    def tr(pts):
        a = math.radians(angle)
        ca, sa = math.cos(a), math.sin(a)
        return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]

    def circle(draw, x, y, rad, fill):
        box = [x - rad, y - rad, x + rad, y + rad]
        if outline:
            draw.ellipse(box, outline=fill, width=lw)
        else:
            draw.ellipse(box, fill=fill)

    if shape == "disk":
        circle(d, cx, cy, r * 0.9, 255)
    elif shape == "ring":
        if outline:
            circle(d, cx, cy, r * 0.95, 255)
            circle(d, cx, cy, r * 0.55, 255)
        else:
            d.ellipse([cx - r * 0.95, cy - r * 0.95, cx + r * 0.95, cy + r * 0.95], fill=255)
            d.ellipse([cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55], fill=0)
    elif shape == "moon":
        a = math.radians(angle)
        ox, oy = cx + 0.45 * r * math.cos(a), cy + 0.45 * r * math.sin(a)
        cut = Image.new("L", (S, S), 0)
        ImageDraw.Draw(cut).ellipse([ox - r * 0.8, oy - r * 0.8, ox + r * 0.8, oy + r * 0.8], fill=255)
        d.ellipse([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=255)
        m = ImageChops.subtract(m, cut)
        if outline:
            m = _contour(m, lw)
    else:
        pts = tr(_POLYGONS[shape])
        if outline:
            d.line(pts + [pts[0]], fill=255, width=lw, joint="curve")
        else:
            d.polygon(pts, fill=255)
    return m.resize((size, size), Image.BOX)


def _contour(mask: Image.Image, width: int) -> Image.Image:
    from PIL import ImageFilter

    k = 2 * (width // 2) + 1
    return ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(max(3, k))))


# ---- backgrounds -----------------------------------------------------------------------------------
def background(size: int, kind: str, base: tuple, other: tuple, rng: np.random.Generator) -> Image.Image:
    """A background of `kind` in colours `base` and `other` (close colours give a mild pattern)."""
    if kind == "plain":
        return Image.new("RGB", (size, size), tuple(base))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    b, o = np.array(base, np.float32), np.array(other, np.float32)
    if kind == "stripes":
        period = rng.uniform(0.12, 0.3) * size
        a = rng.uniform(0, math.pi)
        t = (((xx * math.cos(a) + yy * math.sin(a)) / period) % 1.0 < 0.5).astype(np.float32)
    elif kind == "checker":
        p = rng.uniform(0.1, 0.25) * size
        t = ((np.floor(xx / p) + np.floor(yy / p)) % 2).astype(np.float32)
    elif kind == "dots":
        p = rng.uniform(0.12, 0.25) * size
        fx, fy = (xx % p) / p - 0.5, (yy % p) / p - 0.5
        t = (fx**2 + fy**2 < 0.08).astype(np.float32)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(a) + yy * math.sin(a)) / size
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == "noise":
        small = rng.random((max(2, size // 8), max(2, size // 8))).astype(np.float32)
        t = (
            np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32)
            / 255.0
        )
    elif kind == "waves":
        f = rng.uniform(2, 5) * 2 * math.pi / size
        t = 0.5 + 0.5 * np.sin(f * xx + 3 * np.sin(f * yy * 0.7))
    elif kind == "bricks":
        h = max(2, int(rng.uniform(0.1, 0.18) * size))
        w = 2 * h
        row = (yy // h).astype(int)
        t = (((yy % h) < max(1, h // 6)) | (((xx + (row % 2) * (w // 2)) % w) < max(1, h // 6))).astype(np.float32)
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    img = b[None, None, :] * (1 - t[..., None]) + o[None, None, :] * t[..., None]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def paint(
    img: Image.Image, mask: Image.Image, color: tuple, texture: str = "solid", rng: np.random.Generator | None = None
) -> Image.Image:
    """Composite `color` (optionally striped or dotted with a darker tone) through `mask`."""
    fill = Image.new("RGB", img.size, color)
    if texture != "solid":
        dark = tuple(int(c * 0.6) for c in color)
        fill = background(
            img.size[0], "stripes" if texture == "striped" else "dots", color, dark, rng or np.random.default_rng(0)
        )
    return Image.composite(fill, img, mask)


# ---- colour --------------------------------------------------------------------------------------
def luminance(c: tuple) -> float:
    """Perceived brightness (ITU-R 601 weights): a scene's text colour must stand out from what is under it."""
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
