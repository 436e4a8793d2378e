"""`inspect`: decode every image and caption once; records sizes and formats and finds what is broken."""

from __future__ import annotations

import pyarrow as pa

from ..imaging.decode import MAX_PIXELS, open_image
from .base import Operator, column, map_rows


class Inspect(Operator):
    needs = ("image", "caption")
    schema = {c: pa.int64() for c in ("width", "height", "caption_chars", "caption_words")}

    def __init__(self, max_pixels: int = MAX_PIXELS):
        self.max_pixels = int(max_pixels)

    def __call__(self, batch):
        images, captions = column(batch, "image"), column(batch, "caption")

        def row(i):
            im = open_image(images[i], max_pixels=self.max_pixels)
            return {
                "width": im.width,
                "height": im.height,
                "caption_chars": len(captions[i]),
                "caption_words": len(captions[i].split()),
            }

        return map_rows(row, len(images), ["width", "height", "caption_chars", "caption_words"])
