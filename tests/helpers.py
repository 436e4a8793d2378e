"""Test doubles importable by worker processes (tests/ is put on sys.path by conftest)."""

import hashlib
import time

from unparrot.io.decode import open_image
from unparrot.ops.base import Operator, column, map_rows


class SlowDigest(Operator):
    """Deterministic per-sample output, slow enough to be killed mid-run."""

    needs = ("image",)

    def __init__(self, delay: float = 0.02):
        self.delay = delay

    def __call__(self, batch):
        time.sleep(self.delay * len(batch["uid"]))
        images = column(batch, "image")

        def row(i):
            im = open_image(images[i])
            return {"digest": hashlib.sha256(images[i]).hexdigest()[:16], "w": im.width}

        return map_rows(row, len(images), ["digest", "w"])
