"""Text drawing: fonts by name, sizes that fit a box, and words drawn with the exact quad of their ink.

One place for it because three stages draw words and must agree on what a word looks like: `synth` writes
text into its scenes (and records the quad as OCR ground truth), `evaluate.attack` writes a class name onto
an image, and `evaluate.sync` renders a word on a plain canvas.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


@lru_cache(maxsize=None)
def font_dir() -> Path:
    """DejaVu fonts (open licence) from matplotlib's package data: present wherever unparrot installs."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=4096)
def get_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A font by file name (a DejaVu face from `font_dir`) or absolute .ttf path, cached: scenes and
    attacks ask for the same few faces and sizes thousands of times."""
    path = Path(name) if Path(name).is_absolute() else font_dir() / name
    return ImageFont.truetype(str(path), max(1, int(size)))


def text_size(word: str, font: str, size: int) -> tuple[int, int]:
    """Width and height of the ink box of `word` (not the advance box, so fitting is tight)."""
    l, t, r, b = get_font(font, size).getbbox(word)
    return r - l, b - t


def fit_font_size(word: str, font: str, size: int, max_width: float, max_height: float) -> int:
    """Largest font size <= `size` whose ink box fits in max_width x max_height."""
    while size > 4:
        w, h = text_size(word, font, size)
        if w <= max_width and h <= max_height:
            break
        size = int(size * 0.9)
    return size


def draw_text(
    img: Image.Image,
    word: str,
    font: str,
    size: int,
    x: float,
    y: float,
    color: tuple,
    angle: float = 0.0,
    plate: tuple | None = None,
) -> list[list[float]]:
    """Draw `word` with its ink box's top-left at (x, y), rotated by `angle` degrees (counter-clockwise)
    about the box centre, optionally on a `plate` colour rectangle. Returns the ink quad (4 points,
    clockwise from the top-left of the text) in image coordinates."""
    f = get_font(font, size)
    l, t, r, b = f.getbbox(word)
    w, h = r - l, b - t
    pad = max(2, size // 5)
    layer = Image.new("RGBA", (w + 2 * pad, h + 2 * pad), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    if plate is not None:
        d.rectangle([0, 0, layer.width - 1, layer.height - 1], fill=plate + (255,))
    d.text((pad - l, pad - t), word, font=f, fill=color + (255,))
    corners = [(pad, pad), (pad + w, pad), (pad + w, pad + h), (pad, pad + h)]
    lw, lh = layer.size
    if angle:
        layer = layer.rotate(angle, resample=Image.BICUBIC, expand=True)
    nw, nh = layer.size
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    cx, cy = lw / 2, lh / 2
    # PIL rotates counter-clockwise on screen: (dx, dy) -> (dx cos + dy sin, -dx sin + dy cos)
    quad = [
        [cx + (px - cx) * ca + (py - cy) * sa + (nw - lw) / 2, cy - (px - cx) * sa + (py - cy) * ca + (nh - lh) / 2]
        for px, py in corners
    ]
    ox = int(round(x - min(q[0] for q in quad)))
    oy = int(round(y - min(q[1] for q in quad)))
    img.paste(layer, (ox, oy), layer)
    return [[round(px + ox, 2), round(py + oy, 2)] for px, py in quad]


def rotated_extent(word: str, font: str, size: int, angle: float) -> tuple[float, float]:
    """Width and height of the axis-aligned box around the rotated ink box."""
    w, h = text_size(word, font, size)
    a = math.radians(angle)
    return abs(w * math.cos(a)) + abs(h * math.sin(a)), abs(w * math.sin(a)) + abs(h * math.cos(a))
