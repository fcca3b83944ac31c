"""SIGKILL while each table (and run.json) is being written: what is left behind either loads or is
cleanly absent, and finishing it (``resume``, or a fresh analysis when absent) gives the same tables."""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
from pathlib import Path

import pandas as pd
import pytest

from analysis import analyze
from analysis.store.run import RunError, TABLES, load_run

ARGS = dict(progress=False, latency=False, verify_policies=0, random_policies=2, chunk_size=1)


def _die_on(target: str, nth: int, npz: str, out: str, overwrite: bool = False) -> None:
    """Child: analyse, and on the ``nth`` write of ``target`` leave half the file, then SIGKILL ourselves."""
    import analysis.store.run as store

    seen = {"n": 0}
    write_table = store._write_table

    def die_halfway(path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    def table(df, path, *args, **kwargs):
        write_table(df, path, *args, **kwargs)
        if Path(path).name.split(".")[0] in (target, f"{target}.parquet") or Path(path).name.startswith(f".{target}."):
            seen["n"] += 1
            if seen["n"] == nth:
                die_halfway(Path(path), Path(path).read_bytes())

    def replace(src, dst):  # run.json: killed after the temporary file is half written, before the rename
        if Path(dst).name == target:
            seen["n"] += 1
            if seen["n"] == nth:
                die_halfway(Path(src), Path(src).read_bytes())
        os_replace(src, dst)

    os_replace = os.replace
    store._write_table, store.os.replace = table, replace
    analyze("factories:tiny_mlp", npz, out, overwrite=overwrite, **ARGS)
    os._exit(0)  # the target was never written often enough: the parent fails the test


# (file, which write): 1 = the first write of the Run (staged, renamed into place); 2+ = a later update
KILLS = [(t, 1) for t in TABLES] + [("sensitivity", 3), ("policies", 2), ("run.json", 1), ("run.json", 3)]


@pytest.fixture(scope="module")
def reference(npz, tmp_path_factory):
    return analyze("factories:tiny_mlp", npz, tmp_path_factory.mktemp("ref") / "run", **ARGS)


@pytest.mark.parametrize("target, nth", KILLS, ids=[f"{t}-write{n}" for t, n in KILLS])
def test_kill_while_writing_leaves_a_loadable_or_absent_run(target, nth, npz, reference, tmp_path):
    out = tmp_path / "run"
    child = multiprocessing.get_context("fork").Process(target=_die_on, args=(target, nth, npz, str(out)))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL, "the fault was not injected"
    if out.exists():
        run = load_run(out)  # never a corrupt Run
        assert run.status == "partial"
        finished = analyze("factories:tiny_mlp", npz, out, resume=True, **ARGS)
    else:
        with pytest.raises(RunError):
            load_run(out)
        finished = analyze("factories:tiny_mlp", npz, out, **ARGS)
    assert finished.status == "complete"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "run"] + [p.name for p in out.glob(".*.tmp")]
    assert leftovers == []  # the killed writer's staging folder and temporary files are gone
    cols = ["layer", "format", "status", "metric", "loss", "kl", "output_sqnr_db"]
    pd.testing.assert_frame_equal(finished.sensitivity[cols], reference.sensitivity[cols])
    pd.testing.assert_frame_equal(finished.policies[["name", "metric", "loss", "bytes"]],
                                  reference.policies[["name", "metric", "loss", "bytes"]])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def previous(npz, tmp_path_factory):
    """A finished Run made with other settings (int8 only), for ``overwrite`` to replace."""
    return analyze("factories:tiny_mlp", npz, tmp_path_factory.mktemp("prev") / "run", formats="int8", **ARGS)


# tables' write 1 is the staged Run (the previous Run must survive); later writes, and every rename of run.json,
# follow the swap that the first finished chunk makes (the new Run is at --out and resumes)
OVERWRITE_KILLS = [("sensitivity", 1), ("policies", 1), ("sensitivity", 2), ("policies", 2), ("run.json", 1)]


@pytest.mark.parametrize("target, nth", OVERWRITE_KILLS, ids=[f"{t}-write{n}" for t, n in OVERWRITE_KILLS])
def test_kill_while_overwriting_leaves_the_previous_run_or_a_resumable_new_one(target, nth, npz, reference, previous,
                                                                                tmp_path):
    out = tmp_path / "run"
    shutil.copytree(previous.path, out)
    before = _files(out)
    child = multiprocessing.get_context("fork").Process(target=_die_on, args=(target, nth, npz, str(out), True))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL, "the fault was not injected"
    run = load_run(out)
    if nth == 1 and target != "run.json":  # killed before the new Run was swapped in: the previous one, untouched
        assert _files(out) == before
        finished = analyze("factories:tiny_mlp", npz, out, overwrite=True, **ARGS)
    else:
        assert run.status == "partial" and run.formats == ["int8", "int4"]
        finished = analyze("factories:tiny_mlp", npz, out, resume=True, **ARGS)
    assert finished.status == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and not list(out.glob(".*.tmp"))
    cols = ["layer", "format", "status", "metric", "loss", "kl", "output_sqnr_db"]
    pd.testing.assert_frame_equal(finished.sensitivity[cols], reference.sensitivity[cols])
