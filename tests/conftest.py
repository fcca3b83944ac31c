"""Shared fixtures. One thread everywhere: on these 2-core shared machines two threads
are several times slower for small models."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # tests/factories.py is importable as `factories:NAME`

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=60)
settings.load_profile("ci")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """The demo Run, analysed once per test session (a few seconds)."""
    from analysis import analyze

    return analyze("demo:digits", "digits", tmp_path_factory.mktemp("runs") / "digits", progress=False)
