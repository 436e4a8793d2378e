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


class GatedDigest(SlowDigest):
    """SlowDigest that, on shard `block_shard`, touches `marker` and waits for the file `gate` to exist:
    a run can be killed at a known point (the earlier shards done, this one in flight)."""

    def __init__(self, block_shard: str, marker: str, gate: str, delay: float = 0.0):
        super().__init__(delay)
        self.block_shard, self.marker, self.gate = block_shard, marker, gate

    def __call__(self, batch):
        import os

        if self.block_shard in set(column(batch, "shard")) and not os.path.exists(self.gate):
            open(self.marker, "w").close()
            for _ in range(6000):  # bounded: the test kills this run long before
                if os.path.exists(self.gate):
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError("gate never opened")
        return super().__call__(batch)


class DiesOnce(SlowDigest):
    """SlowDigest whose process exits (as if killed) the first time it sees shard `die_shard`; `marker`
    records that it did, so the retried shard goes through."""

    def __init__(self, die_shard: str, marker: str, delay: float = 0.0):
        super().__init__(delay)
        self.die_shard, self.marker = die_shard, marker

    def __call__(self, batch):
        import os

        if self.die_shard in set(column(batch, "shard")) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().__call__(batch)
