"""Shared pieces for the hostile-input tests: a small npz task and a tiny finished Run."""
from __future__ import annotations

import numpy as np
import pytest

from analysis import analyze


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(p, inputs=rng.normal(size=(40, 64)).astype(np.float32), labels=rng.integers(0, 10, 40))
    return str(p)


@pytest.fixture(scope="module")
def tiny_run(npz, tmp_path_factory):
    """factories:tiny_mlp analysed without latency (a fraction of a second)."""
    return analyze("factories:tiny_mlp", npz, tmp_path_factory.mktemp("runs") / "tiny", progress=False,
                   latency=False, verify_policies=0, random_policies=2)
