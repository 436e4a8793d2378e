import io

import numpy as np
import pytest
from PIL import Image

from helpers import jpeg_bytes
from unparrot.imaging.decode import DecodeError, decode_rgb, open_image


def _save(im, fmt, **kw):
    b = io.BytesIO()
    im.save(b, format=fmt, **kw)
    return b.getvalue()


@pytest.mark.parametrize(
    "make",
    [
        lambda: _save(Image.new("L", (20, 10), 77), "PNG"),
        lambda: _save(Image.new("CMYK", (20, 10), (0, 255, 0, 0)), "JPEG"),
        lambda: _save(Image.new("RGBA", (20, 10), (255, 0, 0, 0)), "PNG"),
        lambda: _save(Image.new("I;16", (20, 10), 40000), "PNG"),
        lambda: _save(Image.new("P", (20, 10), 3), "PNG"),
        lambda: _save(Image.new("1", (20, 10), 1), "PNG"),
        lambda: _save(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
        lambda: _save(Image.new("RGB", (20, 10), (9, 9, 9)), "WEBP"),
    ],
    ids=["gray", "cmyk", "rgba", "16bit", "palette", "bilevel", "1x1", "webp"],
)
def test_modes_become_rgb(make):
    arr = decode_rgb(make())
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3


def test_alpha_composited_on_white():
    arr = decode_rgb(_save(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"))
    assert (arr == 255).all()


def test_animated_gif_first_frame():
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    b = io.BytesIO()
    frames[0].save(b, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_rgb(b.getvalue()).shape == (8, 8, 3)


@pytest.mark.parametrize(
    "data,msg",
    [
        (b"", "empty"),
        (b"definitely not an image", "cannot decode"),
        (jpeg_bytes(size=(64, 64))[:200], "cannot decode"),
    ],
)
def test_bad_bytes_raise_decode_error(data, msg):
    with pytest.raises(DecodeError, match=msg):
        open_image(data)


def test_pixel_limit_checked_before_decoding():
    data = _save(Image.new("L", (3000, 2000)), "PNG")
    with pytest.raises(DecodeError, match="too large"):
        open_image(data, max_pixels=5_000_000)
    assert open_image(data, max_pixels=7_000_000).size == (3000, 2000)
