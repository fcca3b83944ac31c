"""ONNX models take the torch models' sweep: killed with SIGKILL and resumed, on worker pools, with a progress bar."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

from analysis import analyze, load_run
from analysis.data.tasks import load_task
from onnx_fixtures import mlp_data, mlp_graph, residual_mlp_graph

QUANTLENS = str(Path(sys.executable).parent / "quantlens")
TIMED = ("seconds", "latency_ms", "latency_spread_ms", "latency_source")  # timings differ between any two runs
QUIET = dict(progress=False, latency=False, verify_policies=0)


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> tuple[str, str]:
    """A 13-layer ONNX model and a thousand samples: a sweep of a few seconds."""
    folder = tmp_path_factory.mktemp("deep")
    onnx.save(residual_mlp_graph(), folder / "deep.onnx")
    rng = np.random.default_rng(3)
    np.savez(folder / "wide.npz", inputs=rng.normal(size=(1056, 256)).astype(np.float32), labels=rng.integers(0, 10, 1056))
    return str(folder / "deep.onnx"), str(folder / "wide.npz")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("small")
    onnx.save(mlp_graph(), folder / "mlp.onnx")
    return str(folder / "mlp.onnx"), str(mlp_data(folder))


@pytest.fixture(scope="module")
def small_serial(small, tmp_path_factory):
    return analyze(*small, tmp_path_factory.mktemp("serial") / "r", **QUIET)


def _assert_same_results(a, b) -> None:
    for name in ("sensitivity", "policies"):
        x, y = getattr(a, name), getattr(b, name)
        pd.testing.assert_frame_equal(x.drop(columns=[c for c in TIMED if c in x]),
                                      y.drop(columns=[c for c in TIMED if c in y]), check_exact=True, obj=name)


@pytest.mark.slow
def test_onnx_sweep_killed_with_sigkill_resumes_to_the_uninterrupted_tables(deep, tmp_path):
    model, data = deep
    out = tmp_path / "killed"
    cmd = [QUANTLENS, "analyze", model, "--task", data, "--out", str(out), "--calib", "32", "--chunk-size", "1",
           "--quiet", "--no-latency", "--verify-policies", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    jobs = out / "jobs"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if jobs.is_dir() and len(list(jobs.glob("*.json"))) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"sweep ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    partial = load_run(out)
    assert partial.meta["model"]["kind"] == "onnx" and partial.status == "partial"
    assert 3 <= len(list(jobs.glob("*.json"))) < partial.meta["progress"]["total"]
    assert (partial.sensitivity.status == "pending").any()

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    run = load_run(out)
    assert run.status == "complete" and run.meta["sweep"]["resumed"] is True
    assert run.meta["progress"]["done"] == run.meta["progress"]["total"]
    fresh = analyze(model, data, tmp_path / "fresh", calib=32, chunk_size=1, **QUIET)
    _assert_same_results(run, fresh)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["process", "ray"])
def test_onnx_on_a_worker_pool_matches_serial(small, small_serial, executor, tmp_path, monkeypatch):
    if executor == "ray":
        pytest.importorskip("ray")
        monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")  # other tests' memory must not get workers killed
    run = analyze(*small, tmp_path / executor, executor=executor, workers=2, chunk_size=2, **QUIET)
    assert run.meta["sweep"]["executor"] == executor and run.status == "complete"
    assert (run.sensitivity.status == "ok").all()
    _assert_same_results(run, small_serial)


def test_onnx_sweep_shows_a_progress_bar_on_stderr(small, tmp_path, capsys):
    run = analyze(*small, tmp_path / "r", progress=True, latency=False, verify_policies=0)
    n_batches = math.ceil(run.meta["data"]["n_eval"] / load_task(small[1]).batch_size)
    err = capsys.readouterr().err
    assert "sweep:" in err and f"/{run.meta['sweep']['jobs'] * n_batches} " in err, err[-300:]
    analyze(*small, tmp_path / "quiet", **QUIET)
    assert capsys.readouterr().err == ""


def test_weights_for_an_onnx_model_is_bad_input_not_ignored(small, tmp_path):
    from analysis.errors import InputError

    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match=r"--weights .*w\.safetensors.*mlp\.onnx"):
        analyze(*small, tmp_path / "r", weights=str(tmp_path / "w.safetensors"), **QUIET)
    assert not (tmp_path / "r").exists()


def test_nan_inside_the_model_on_calibration_data_is_one_line_and_writes_nothing(tmp_path, capsys):
    from onnx import TensorProto, helper, numpy_helper

    from analysis.cli.main import main

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Sqrt", ["x"], ["r"], name="sqrt"),  # NaN for negative inputs
                               helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    model = tmp_path / "nan.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(model))
    np.savez(tmp_path / "x.npz", inputs=rng.normal(size=(32, 8)).astype(np.float32))
    out = tmp_path / "run"
    assert main(["analyze", str(model), "--task", str(tmp_path / "x.npz"), "--out", str(out), "--quiet",
                 "--no-latency", "--verify-policies", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN or Inf in the input of layer 'mm' on the calibration data" in err
    assert not out.exists()
