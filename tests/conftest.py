import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # test-double operators in helpers.py, importable by workers


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
