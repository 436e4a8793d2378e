"""`spot`: text spotting per image (docs/methods.md §1): boxes, texts, scores, has_text, n_text, text_area.

Only instances that pass the filters are kept: recognition score >= `min_score`, box area >= `min_area`
(pixels of the original image) and at least `min_chars` letters/digits in the read text. The last one
(ours, default 2) drops single glyphs, which a scene-text recogniser happily reads off shapes and icons
("O" for a ring, "C" for a crescent, "+" for a cross) and which never make a parroted caption word.
"""

from __future__ import annotations

from dataclasses import dataclass

import io
import re

import numpy as np
import pyarrow as pa

from ..flags import option
from ..imaging.decode import MAX_PIXELS, DecodeError, decode_rgb
from .base import Operator, column
from .spotters import get_spotter

_ALNUM = re.compile(r"[^\W_]", re.UNICODE)
SPOT_COLUMNS = ("boxes", "texts", "scores", "has_text", "n_text", "text_area", "width", "height")


def polygon_union_area(quads, width: int, height: int) -> float:
    """Area of the union of the quads (as polygons, clipped to the image) over the image area."""
    if not quads or width <= 0 or height <= 0:
        return 0.0
    from shapely.geometry import Polygon, box
    from shapely.ops import unary_union

    polys = []
    for q in quads:
        p = Polygon(q)
        if not p.is_valid:
            p = p.buffer(0)
        if not p.is_empty:
            polys.append(p)
    if not polys:
        return 0.0
    union = unary_union(polys).intersection(box(0, 0, width, height))
    return float(union.area) / (width * height)


def quad_area(q) -> float:
    x, y = np.asarray(q, float).T
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header only."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception as e:  # noqa: BLE001
        raise DecodeError(f"cannot decode image: {type(e).__name__}: {e}") from None


@dataclass
class SpotConfig:
    """The spot operator's options (its `__init__` defaults read these). The det_* sides are options of
    the rapidocr backend, passed through only when given."""

    backend: str = option("rapidocr", "OCR backend: rapidocr, oracle (synthetic ground truth) or module:Class")
    min_score: float = option(0.5, "minimum recognition score of a text instance")
    min_area: float = option(0.0, "minimum box area in pixels")
    min_chars: int = option(2, "minimum letters/digits in a text instance")
    det_max_side: int | None = option(None, "downscale images whose long side is larger (speed)")
    det_min_side: int | None = option(None, "upscale images whose long side is smaller (recall on tiny images)")


class Spot(Operator):
    needs = ("image",)
    version = 1
    schema = {
        "boxes": pa.list_(pa.list_(pa.list_(pa.float64()))),
        "texts": pa.list_(pa.string()),
        "scores": pa.list_(pa.float64()),
        "has_text": pa.bool_(),
        "n_text": pa.int64(),
        "text_area": pa.float64(),
        "width": pa.int64(),
        "height": pa.int64(),
    }

    def __init__(
        self,
        backend: str = SpotConfig.backend,
        min_score: float = SpotConfig.min_score,
        min_area: float = SpotConfig.min_area,
        min_chars: int = SpotConfig.min_chars,
        max_pixels: int = MAX_PIXELS,
        **backend_params,
    ):
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {min_score}")
        self.min_score, self.min_area, self.min_chars = float(min_score), float(min_area), int(min_chars)
        self.max_pixels = int(max_pixels)
        self.spotter = get_spotter(backend, **backend_params)

    def keep(self, quad, text: str, score: float) -> bool:
        return (
            score >= self.min_score and quad_area(quad) >= self.min_area and len(_ALNUM.findall(text)) >= self.min_chars
        )

    def __call__(self, batch):
        images, metas = column(batch, "image"), column(batch, "meta")
        n = len(images)
        decoded, sizes, errors = [None] * n, [(0, 0)] * n, [None] * n
        for i in range(n):
            try:
                if self.spotter.needs_image:
                    decoded[i] = decode_rgb(images[i], max_pixels=self.max_pixels)
                    sizes[i] = (decoded[i].shape[1], decoded[i].shape[0])
                else:
                    sizes[i] = image_size(images[i])
            except DecodeError as e:
                errors[i] = str(e)
        ok = [i for i in range(n) if errors[i] is None]
        found = self._spot([decoded[i] for i in ok], [metas[i] for i in ok], ok, errors)
        out = {c: [None] * n for c in SPOT_COLUMNS}
        out["error"] = errors
        for i, inst in found.items():
            try:
                kept = [(self._quad(q), str(t), float(s)) for q, t, s in inst]
                kept = [k for k in kept if self.keep(*k)]
                area = polygon_union_area([q for q, _, _ in kept], *sizes[i])
            except Exception as e:  # noqa: BLE001 - a plug-in spotter's malformed answer costs only its image
                errors[i] = f"OCR failed: malformed spotter output: {type(e).__name__}: {e}"
                continue
            out["boxes"][i] = [q for q, _, _ in kept]
            out["texts"][i] = [t for _, t, _ in kept]
            out["scores"][i] = [s for _, _, s in kept]
            out["n_text"][i] = len(kept)
            out["has_text"][i] = bool(kept)
            out["text_area"][i] = area
            out["width"][i], out["height"][i] = sizes[i]
        return out

    @staticmethod
    def _quad(q) -> list:
        quad = [[float(x), float(y)] for x, y in q]
        if len(quad) != 4 or not all(np.isfinite(v) for p in quad for v in p):
            raise ValueError(f"a box must be 4 finite (x, y) points, got {len(quad)} points")
        return quad

    def _spot(self, images, metas, idx, errors) -> dict[int, list]:
        """Spot a batch; if the batch fails, retry image by image so one bad image costs only itself."""
        if not idx:
            return {}
        try:
            return dict(zip(idx, self.spotter.spot(images, metas)))
        except Exception as e:  # noqa: BLE001
            if len(idx) == 1:
                errors[idx[0]] = f"OCR failed: {type(e).__name__}: {e}"
                return {}
        out = {}
        for j, i in enumerate(idx):
            try:
                out[i] = self.spotter.spot([images[j]], [metas[j]])[0]
            except Exception as e:  # noqa: BLE001
                errors[i] = f"OCR failed: {type(e).__name__}: {e}"
        return out
