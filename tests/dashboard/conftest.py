"""Fixtures for the dashboard's AppTest tests: small synthetic Runs and broken ones."""
from __future__ import annotations

import json
import shutil

import pytest
from apptest_support import make_app

from analysis.store.synthetic import synthetic_run


@pytest.fixture(scope="session")
def syn_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dash") / "syn40"
    synthetic_run(path, 40, seed=7)
    return str(path)


@pytest.fixture(scope="session")
def other_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("dash") / "syn12"
    synthetic_run(path, 12, seed=8)
    return str(path)


@pytest.fixture
def bad_dirs(tmp_path, syn_dir) -> dict[str, str]:
    """A folder that is not a Run, a Run of an unknown schema version, a Run with a corrupted table."""
    not_run = tmp_path / "not_a_run"
    not_run.mkdir()
    (not_run / "notes.txt").write_text("hello")
    schema = tmp_path / "future"
    shutil.copytree(syn_dir, schema)
    meta = json.loads((schema / "run.json").read_text())
    meta["schema"] = "quantlens.run/99"
    (schema / "run.json").write_text(json.dumps(meta))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(syn_dir, corrupt)
    (corrupt / "sensitivity.parquet").write_bytes(b"PAR1 this is not parquet")
    return {"not_run": str(not_run), "schema": str(schema), "corrupt": str(corrupt)}


@pytest.fixture
def app():
    return make_app
