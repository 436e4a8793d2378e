"""Test doubles importable by worker processes (tests/ is put on sys.path by conftest)."""

import hashlib
import time

import numpy as np

from unparrot.imaging.decode import open_image
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


class HeldDigest(SlowDigest):
    """SlowDigest that, while the file `hold` exists, stops in every shard not named in `free` after
    announcing itself (touches `<hold>.<shard>.waiting`). A test that waits for the announcements knows
    exactly which shards are finished when it kills a worker, on a fast machine or a slow one."""

    def __init__(self, hold: str = "", free: tuple = (), delay: float = 0.0):
        super().__init__(delay)
        self.hold, self.free = hold, tuple(free)

    def __call__(self, batch):
        import os
        from pathlib import Path

        shard = batch["shard"][0]
        if self.hold and shard not in self.free and os.path.exists(self.hold):
            Path(f"{self.hold}.{shard}.waiting").touch()
            while os.path.exists(self.hold):
                time.sleep(0.02)
        return super().__call__(batch)


def assert_close_scaled(a, b, rel: float = 1e-5, what: str = ""):
    """|a - b| <= rel * max|a|, computed in float64: a tolerance that scales with the values compared.

    Float32 results differ between machines in the last bits (summation order of threads and CPU kernels);
    an absolute tolerance holds for values of one size only. A real difference (a resumed run that lost its
    optimizer state, one step more or less) is orders of magnitude above `rel`."""
    a = np.asarray(a.detach().double() if hasattr(a, "detach") else a, np.float64)
    b = np.asarray(b.detach().double() if hasattr(b, "detach") else b, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = float(np.abs(a).max()) if a.size else 0.0
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    assert diff <= rel * scale, f"{what}: largest difference {diff:.3g} > {rel:g} x largest value {scale:.3g}"


KILLED = 137  # the exit code of a child killed by run_killed (as a shell reports SIGKILL)


def count_renames(fn) -> int:
    """How many os.replace calls fn() makes (each one the moment a finished temp file becomes visible)."""
    import os

    real, n = os.replace, [0]

    def counting(*a, **k):
        n[0] += 1
        return real(*a, **k)

    os.replace = counting
    try:
        fn()
    finally:
        os.replace = real
    return n[0]


def count_temp_files(fn) -> int:
    """How many temp files (tempfile.mkstemp, what every atomic writer starts with) fn() creates."""
    import tempfile

    real, n = tempfile.mkstemp, [0]

    def counting(*a, **k):
        n[0] += 1
        return real(*a, **k)

    tempfile.mkstemp = counting
    try:
        fn()
    finally:
        tempfile.mkstemp = real
    return n[0]


def run_killed(fn, n: int, at: str = "replace") -> int:
    """Run fn() in a forked child that dies just before its n-th os.replace (at="replace"), or just after
    creating its n-th temp file, before a byte is in it (at="mkstemp": in the middle of a write), by
    os._exit: no `finally`, no `except BaseException` cleanup, no atexit, like a SIGKILL landing there.
    Returns the child's exit code: KILLED, or 0 when fn finished first (1: it raised)."""
    import os
    import tempfile
    import traceback

    pid = os.fork()
    if pid == 0:  # the child never returns into the test
        import signal
        import sys

        code = 0
        signal.alarm(600)  # a hang fails the test (as a SIGALRM exit) instead of stopping the suite
        # OpenMP thread pools do not survive fork: the child runs single-threaded
        if "faiss" in sys.modules:
            sys.modules["faiss"].omp_set_num_threads(1)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)
        try:
            real, seen = (os.replace if at == "replace" else tempfile.mkstemp), [0]

            def dying(*a, **k):
                seen[0] += 1
                if seen[0] == n and at == "replace":
                    os._exit(KILLED)
                out = real(*a, **k)
                if seen[0] == n:
                    os._exit(KILLED)
                return out

            if at == "replace":
                os.replace = dying
            else:
                tempfile.mkstemp = dying
            fn()
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def kill_points(total: int, k: int, seed: int) -> list[int]:
    """k distinct rename numbers in 1..total, seeded: where run_killed strikes."""
    rng = np.random.default_rng(seed)
    return sorted(int(x) + 1 for x in rng.choice(total, size=min(k, total), replace=False))


def tree_bytes(root, skip=()) -> dict:
    """{relative path: content} of every file under root (skipping paths that start with an entry of skip):
    the bytes, or for a tar shard its members' names and bytes in order (header mtimes are the time of
    writing, so two equal reshards differ there only)."""
    import tarfile
    from pathlib import Path

    def content(p):
        if p.suffix != ".tar":
            return p.read_bytes()
        with tarfile.open(p) as tf:
            return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]

    root = Path(root)
    return {
        str(p.relative_to(root)): content(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not str(p.relative_to(root)).startswith(tuple(skip))
    }


class HidesShard(SlowDigest):
    """SlowDigest that, at its first batch, moves the file `victim` aside (to `victim + ".aside"`), once
    (`victim + ".once"` remembers it): a shard that disappears while the stage runs."""

    def __init__(self, victim: str = "", delay: float = 0.0):
        super().__init__(delay)
        self.victim = victim

    def __call__(self, batch):
        import os

        if self.victim and not os.path.exists(self.victim + ".once"):
            open(self.victim + ".once", "w").close()
            os.replace(self.victim, self.victim + ".aside")
        return super().__call__(batch)


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
