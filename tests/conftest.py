import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # test-double operators in helpers.py, importable by workers


def jpeg_bytes(color=(200, 30, 30), size=(32, 24), fmt="JPEG", mode="RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_tar(path, members):
    """members: list of (name, bytes) written in order, exactly as given (names unchecked)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="session")
def synth_pool(tmp_path_factory):
    """A small learnable-preset world with 3 shards, shared read-only by tests that need one."""
    from unparrot.synth.generate import synth

    root = tmp_path_factory.mktemp("synth") / "pool"
    synth(root, n=300, preset="learnable", seed=3, shard_size=100, eval_per_class=4, workers=2, progress=False)
    return root


@pytest.fixture
def rng():
    return np.random.default_rng(0)
