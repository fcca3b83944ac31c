"""Process-pool and Ray executors give the serial sweep's tables, and survive a worker crash."""
import os
from pathlib import Path

import numpy as np
import pytest

from analysis import analyze
from analysis.store.run import TABLES


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "small.npz"
    rng = np.random.default_rng(0)
    np.savez(p, inputs=rng.normal(size=(160, 64)).astype(np.float32), labels=rng.integers(0, 10, 160))
    return str(p)


@pytest.fixture(scope="module")
def serial_run(data, tmp_path_factory):
    return analyze("factories:tiny_mlp", data, tmp_path_factory.mktemp("serial") / "r", progress=False, latency=False, verify_policies=0)


def _same(a: Path, b: Path):
    for name in TABLES:
        assert (a / f"{name}.parquet").read_bytes() == (b / f"{name}.parquet").read_bytes(), name


@pytest.fixture
def crash_env(tmp_path, monkeypatch):
    flag = tmp_path / "crashed.flag"
    monkeypatch.setenv("QUANTLENS_TEST_CRASH_FLAG", str(flag))
    monkeypatch.setenv("QUANTLENS_TEST_MAIN_PID", str(os.getpid()))
    return flag


@pytest.mark.slow
def test_process_pool_matches_serial_and_retries_a_dead_worker(data, serial_run, tmp_path, crash_env):
    run = analyze("factories:crash_once", data, tmp_path / "p", executor="process", workers=2, chunk_size=2, progress=False, latency=False, verify_policies=0)
    assert crash_env.exists()  # a worker really died mid-sweep
    assert run.meta["sweep"]["executor"] == "process" and run.status == "complete"
    _same(run.path, serial_run.path)  # crash_once computes exactly what tiny_mlp does


@pytest.mark.slow
def test_ray_local_cluster_matches_serial_and_retries_a_dead_actor(data, serial_run, tmp_path, crash_env, monkeypatch):
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")  # other tests' memory must not get workers killed
    run = analyze("factories:crash_once", data, tmp_path / "ray", executor="ray", workers=2, chunk_size=2, progress=False, latency=False, verify_policies=0)
    assert crash_env.exists()
    assert run.meta["sweep"]["executor"] == "ray" and run.meta["sweep"]["workers"] == 2
    _same(run.path, serial_run.path)


@pytest.mark.slow
def test_ray_worker_that_loads_another_model_stops_the_sweep_with_the_reason(data, monkeypatch):
    """A constructor that raises is not restarted by Ray: the sweep stops at once and says why."""
    pytest.importorskip("ray")
    from analysis.engine.executors import ExecutorError, RayPool, WorkerSpec
    from analysis.engine.sweep import Job

    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "0")
    spec = WorkerSpec(model="factories:tiny_mlp", weights=None, task=data, task_metric=None, calib=None, seed=0,
                      metric_name="accuracy", model_sha256="0" * 64, formats=[], incremental=False)
    pool = RayPool(spec, 1)
    try:
        pool.submit([Job("k", policy_name="p", policy=())], [])
        with pytest.raises(ExecutorError, match=r"stopped for good \(.*expected 000000000000"):
            list(pool.results())
    finally:
        pool.close()


def test_unknown_executor_is_bad_input(data, tmp_path):
    from analysis.api import AnalysisError

    with pytest.raises(AnalysisError, match="--executor: unknown executor 'dask'"):
        analyze("factories:tiny_mlp", data, tmp_path / "x", executor="dask", progress=False, latency=False, verify_policies=0)
    assert not (tmp_path / "x").exists()


def test_balanced_chunks_put_dear_jobs_first_and_respect_budget_and_size():
    from hypothesis import given, strategies as st

    from analysis.engine.executors import balanced_chunks
    from analysis.engine.sweep import Job

    @given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=60), st.floats(1.5, 8.0), st.integers(1, 10))
    def check(costs, budget, max_jobs):
        jobs = [Job(f"k{i}", layer=f"l{i}", format="int8") for i in range(len(costs))]
        cost = {j: c for j, c in zip(jobs, costs)}.__getitem__
        chunks = balanced_chunks(jobs, cost, budget, max_jobs)
        flat = [j for c in chunks for j in c]
        assert sorted(j.key for j in flat) == sorted(j.key for j in jobs)  # each job exactly once
        assert [cost(j) for j in flat] == sorted(costs, reverse=True)
        for c in chunks:
            assert 1 <= len(c) <= max_jobs
            assert len(c) == 1 or 1.0 + sum(map(cost, c)) <= budget + 1e-9

    check()


def test_chunk_size_below_one_is_bad_input(data, tmp_path):
    from analysis.api import AnalysisError

    with pytest.raises(AnalysisError, match="--chunk-size 0: must be at least 1"):
        analyze("factories:tiny_mlp", data, tmp_path / "x", chunk_size=0, progress=False, latency=False, verify_policies=0)
