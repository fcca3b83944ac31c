"""``overwrite=True``: a new Run that fails leaves the previous Run exactly as it was; once the new
sweep has persisted records, the new Run is the one at ``out`` and ``resume`` finishes it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis import analyze, load_run
from analysis.engine.executors import ExecutorError
from analysis.engine.sweep import SweepRunner
from analysis.errors import InputError

ARGS = dict(progress=False, latency=False, verify_policies=0, random_policies=2)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def previous(tiny_run, tmp_path) -> Path:
    """A finished Run at ``tmp_path/run`` (a copy of the module's, so each test may replace it)."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run.path, out)
    return out


def _assert_left_as_it_was(out: Path, before: dict[str, bytes]) -> None:
    assert _files(out) == before
    assert load_run(out).status == "complete"
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no staging folder or old copy beside it


def test_overwrite_with_a_model_whose_fp32_output_is_nan_keeps_the_previous_run(previous, npz):
    before = _files(previous)
    with pytest.raises(InputError, match="NaN or Inf"):
        analyze("hostile_models:nan_in_fp32", npz, previous, overwrite=True, **ARGS)
    _assert_left_as_it_was(previous, before)


def test_overwrite_that_fails_before_its_first_records_keeps_the_previous_run(previous, npz, monkeypatch):
    """A failure after the new Run's tables are written (workers that cannot load the model, say)."""
    def dead_workers(self, jobs, progress=None):
        raise ExecutorError("worker processes died 4 times")

    monkeypatch.setattr(SweepRunner, "run", dead_workers)
    before = _files(previous)
    with pytest.raises(ExecutorError):
        analyze("factories:tiny_mlp", npz, previous, overwrite=True, formats="int8", **ARGS)
    _assert_left_as_it_was(previous, before)


def test_overwrite_interrupted_after_its_first_records_resumes_to_the_new_run(previous, npz, monkeypatch, tmp_path):
    run_chunk, calls = SweepRunner.run, []

    def dies_on_the_third_chunk(self, jobs, progress=None):
        calls.append(len(jobs))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run_chunk(self, jobs, progress)

    monkeypatch.setattr(SweepRunner, "run", dies_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        analyze("factories:tiny_mlp", npz, previous, overwrite=True, formats="int8", chunk_size=1, **ARGS)
    partial = load_run(previous)
    assert partial.status == "partial" and partial.formats == ["int8"]  # the new Run replaced the old one
    assert len(list((previous / "jobs").glob("*.json"))) == 2
    monkeypatch.setattr(SweepRunner, "run", run_chunk)

    finished = analyze("factories:tiny_mlp", npz, previous, resume=True, formats="int8", chunk_size=1, **ARGS)
    fresh = analyze("factories:tiny_mlp", npz, tmp_path / "fresh", formats="int8", chunk_size=1, **ARGS)
    assert finished.status == "complete" and finished.meta["sweep"]["resumed"] is True
    for name in ("sensitivity", "policies", "layers", "cost"):
        pd.testing.assert_frame_equal(getattr(finished, name), getattr(fresh, name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "run"]
