"""SIGKILL while each table (and run.json) is being written: what is left behind either loads or is
cleanly absent, and finishing it (``resume``, or a fresh analysis when absent) gives the same tables."""
from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

import pandas as pd
import pytest

from analysis import analyze
from analysis.store.run import RunError, TABLES, load_run

ARGS = dict(progress=False, latency=False, random_policies=2, chunk_size=1)


def _die_on(target: str, nth: int, npz: str, out: str) -> None:
    """Child: analyse, and on the ``nth`` write of ``target`` leave half the file, then SIGKILL ourselves."""
    import analysis.store.run as store

    seen = {"n": 0}
    write_table = store._write_table

    def die_halfway(path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    def table(df, path):
        write_table(df, path)
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
    analyze("factories:tiny_mlp", npz, out, **ARGS)
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
