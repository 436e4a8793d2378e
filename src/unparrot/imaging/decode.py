"""Image decoding that never trusts its input: size limits before pixels are decoded, one colour model out."""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
MAX_PIXELS = 50_000_000  # DataComp/LAION images are far smaller; 100 MP inputs are bombs or scans

# A truncated JPEG must be an error, not a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We check sizes ourselves, before decoding, with a clear message.
Image.MAX_IMAGE_PIXELS = None


class DecodeError(ValueError):
    """An image that cannot be used, with a reason fit for the errors table."""


def open_image(data: bytes, max_pixels: int = MAX_PIXELS, draft: int | None = None) -> Image.Image:
    """Decode bytes into an RGB PIL image.

    Handles grayscale, CMYK, palette, alpha (composited on white), 16-bit and animated (first frame)
    images and EXIF orientation. `draft` lets JPEG decode at a reduced scale when the consumer only
    needs about that many pixels on the short side (much faster for big photos).
    """
    if not data:
        raise DecodeError("empty image (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w < 1 or h < 1:
                raise DecodeError(f"image has no pixels ({w}x{h})")
            if w * h > max_pixels:
                raise DecodeError(f"image too large: {w}x{h} = {w * h / 1e6:.1f} MP (limit {max_pixels / 1e6:.1f} MP)")
            if draft and im.format == "JPEG":
                im.draft("RGB", (draft, draft))
            im.load()
    except DecodeError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        msg = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # reasons must be reproducible
        raise DecodeError(f"cannot decode image: {type(e).__name__}: {msg}") from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:
        pass  # a broken EXIF block is not worth losing the image
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white (as a browser shows them on white)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        return Image.fromarray((arr / max(hi, 1) * 255).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
        lo, hi = float(arr.min()), float(arr.max())
        return Image.fromarray(((arr - lo) / max(hi - lo, 1e-9) * 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS, draft: int | None = None) -> np.ndarray:
    """Decode into an HxWx3 uint8 array (see `open_image`)."""
    return np.asarray(open_image(data, max_pixels=max_pixels, draft=draft))


def encode_image(im: Image.Image | np.ndarray, fmt: str = "jpg", quality: int = 92) -> bytes:
    """Encode an RGB image as jpg, png or webp bytes."""
    if isinstance(im, np.ndarray):
        im = Image.fromarray(im)
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt in ("jpg", "jpeg"):
        im.convert("RGB").save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        im.save(buf, format="PNG", compress_level=1)
    elif fmt == "webp":
        im.save(buf, format="WEBP", lossless=True, method=0)
    else:
        raise ValueError(f"unknown image format {fmt!r} (jpg, png, webp)")
    return buf.getvalue()
