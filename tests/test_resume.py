"""A sweep killed with SIGKILL at a random moment resumes to the same tables as an uninterrupted one."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from analysis import analyze, load_run
from analysis.store.run import TABLES

ROOT = Path(__file__).resolve().parents[1]
QUANTLENS = str(Path(sys.executable).parent / "quantlens")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "wide.npz"
    rng = np.random.default_rng(3)
    np.savez(p, inputs=rng.normal(size=(1056, 256)).astype(np.float32), labels=rng.integers(0, 10, 1056))
    return str(p)


def _cmd(data, out, *extra):
    return [QUANTLENS, "analyze", "factories:residual_mlp", "--task", data, "--out", str(out), "--calib", "32",
            "--chunk-size", "1", "--quiet", "--no-latency", "--verify-policies", "0", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "tests")}


def _assert_same_tables(a: Path, b: Path):
    for name in TABLES:
        assert (a / f"{name}.parquet").read_bytes() == (b / f"{name}.parquet").read_bytes(), name


@pytest.mark.slow
def test_kill_9_mid_sweep_then_resume_gives_identical_tables(data, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    jobs = out / "jobs"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if jobs.is_dir() and len(list(jobs.glob("*.json"))) >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"sweep ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    partial = load_run(out)  # a killed sweep leaves a Run that opens and says it is partial
    n_done = len(list(jobs.glob("*.json")))
    assert partial.status == "partial"
    assert 5 <= n_done < partial.meta["progress"]["total"]
    assert (partial.sensitivity.status == "ok").sum() >= 4
    assert (partial.sensitivity.status == "pending").any()

    bad = subprocess.run(_cmd(data, out), env=_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "--resume" in bad.stderr  # refuses to clobber without --resume

    resumed = subprocess.run(_cmd(data, out, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    run = load_run(out)
    assert run.status == "complete" and run.meta["sweep"]["resumed"] is True
    assert run.meta["progress"]["done"] == run.meta["progress"]["total"]

    fresh = analyze("factories:residual_mlp", data, tmp_path / "fresh", calib=32, progress=False, latency=False, verify_policies=0)
    _assert_same_tables(out, fresh.path)


def test_resume_refuses_a_run_made_with_other_settings(data, tmp_path, capsys):
    from analysis.cli.main import main

    out = tmp_path / "r"
    analyze("factories:tiny_mlp", _small(tmp_path), out, progress=False, latency=False, verify_policies=0)
    code = main(["analyze", "factories:tiny_mlp", "--task", _small(tmp_path), "--out", str(out), "--resume",
                 "--formats", "int8", "--quiet"])
    assert code == 2 and "sweep.context_key" in capsys.readouterr().err
    code = main(["analyze", "factories:tiny_mlp", "--task", _small(tmp_path), "--out", str(tmp_path / "none"),
                 "--resume", "--quiet"])
    assert code == 2 and "holds no Run to resume" in capsys.readouterr().err


def test_resume_of_a_complete_run_recomputes_nothing(tmp_path):
    out = tmp_path / "r"
    analyze("factories:tiny_mlp", _small(tmp_path), out, progress=False, latency=False, verify_policies=0)
    stamp = {p.name: p.stat().st_mtime_ns for p in (out / "jobs").iterdir()}
    before = {name: (out / f"{name}.parquet").read_bytes() for name in TABLES}
    analyze("factories:tiny_mlp", _small(tmp_path), out, resume=True, progress=False, latency=False, verify_policies=0)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "jobs").iterdir()} == stamp
    assert {name: (out / f"{name}.parquet").read_bytes() for name in TABLES} == before


def _small(tmp_path):
    p = tmp_path / "small.npz"
    if not p.exists():
        rng = np.random.default_rng(0)
        np.savez(p, inputs=rng.normal(size=(80, 64)).astype(np.float32), labels=rng.integers(0, 10, 80))
    return str(p)


def test_resume_of_a_run_begun_without_fed_by_adds_it_and_keeps_the_layers(tmp_path):
    """A Run begun by a version that did not record ``fed_by``: the resumed sweep adds the column (run.json then
    says the fx graph was read), every other column of the layers table as it was."""
    import json

    import pandas as pd

    out = tmp_path / "r"
    fresh = analyze("factories:tiny_mlp", _small(tmp_path), out, progress=False, latency=False, verify_policies=0)
    assert fresh.fed_by() is not None
    old = pd.read_parquet(out / "layers.parquet").drop(columns=["fed_by"])
    old.to_parquet(out / "layers.parquet")
    meta = json.loads((out / "run.json").read_text())
    meta.pop("structure")
    meta["status"] = "partial"
    (out / "run.json").write_text(json.dumps(meta))
    for job in sorted((out / "jobs").iterdir())[:2]:
        job.unlink()
    run = analyze("factories:tiny_mlp", _small(tmp_path), out, resume=True, progress=False, latency=False,
                  verify_policies=0)
    assert run.fed_by() == fresh.fed_by()
    assert run.meta["structure"] == fresh.meta["structure"]
    pd.testing.assert_frame_equal(run.layers.drop(columns=["fed_by"]), old)
