"""Text masking (T-MARS, docs/methods.md §4): hide the text boxes found by `spot` so a CLIP score measures what
the rest of the image shows.

fill = "mean"    each box is filled with the mean colour of its own pixels (T-MARS)
       "inpaint" OpenCV Telea inpainting of the boxes (slower, less visible)
       "solid"   a fixed colour (`color`)
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .decode import decode_rgb, encode_image

DEFAULT_FILL = "mean"  # the one default of every mask_fill option (T-MARS)
FILLS = (DEFAULT_FILL, "inpaint", "solid")


class Masker:
    def __init__(
        self, fill: str = DEFAULT_FILL, color: tuple = (127, 127, 127), inpaint_radius: int = 3, dilate: int = 0
    ):
        if fill not in FILLS:
            raise ValueError(f"unknown mask fill {fill!r}; one of {', '.join(FILLS)}")
        self.fill, self.color, self.radius, self.dilate = (
            fill,
            tuple(int(c) for c in color),
            int(inpaint_radius),
            int(dilate),
        )

    def _mask(self, shape, quad) -> np.ndarray:
        m = Image.new("L", (shape[1], shape[0]), 0)
        ImageDraw.Draw(m).polygon(
            [(float(x), float(y)) for x, y in quad], fill=255, outline=255, width=1 + 2 * self.dilate
        )
        return np.asarray(m) > 0

    def mask_array(self, img: np.ndarray, quads) -> np.ndarray:
        """A copy of HxWx3 uint8 `img` with every quad filled."""
        out = img.copy()
        if quads is None or len(quads) == 0:
            return out
        if self.fill == "inpaint":
            import cv2

            union = np.zeros(img.shape[:2], bool)
            for q in quads:
                union |= self._mask(img.shape, q)
            return cv2.inpaint(np.ascontiguousarray(img), union.astype(np.uint8) * 255, self.radius, cv2.INPAINT_TELEA)
        for q in quads:
            m = self._mask(img.shape, q)
            if not m.any():
                continue
            out[m] = img[m].mean(axis=0).round().astype(np.uint8) if self.fill == "mean" else self.color
        return out

    def mask_bytes(self, data: bytes, quads, fmt: str = "jpg") -> bytes:
        """Decode, mask and re-encode an image (reshard --mask-text)."""
        return encode_image(self.mask_array(decode_rgb(data), quads), fmt if fmt != "jpeg" else "jpg")

    def mask_pil(self, im: Image.Image, quads) -> Image.Image:
        return Image.fromarray(self.mask_array(np.asarray(im.convert("RGB")), quads))
