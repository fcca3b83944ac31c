"""Rows of the policies table written by different processes (verifies, a running sweep) are never lost."""
import multiprocessing
import shutil
import time

import numpy as np
import pandas as pd

from analysis import analyze
from analysis.store.atomic import folder_lock
from analysis.store.run import load_run, merge_policy_rows


def _row(run, name, kind="user"):
    base = run.policies.iloc[0].to_dict()
    return pd.DataFrame([{**base, "name": name, "kind": kind, "metric": 0.5}])


def _add_row(path: str, name: str) -> None:
    run = load_run(path)  # read before the other writer's row exists
    merge_policy_rows(run, _row(run, name))


def test_a_writer_waits_for_the_lock_and_keeps_the_other_writers_row(digits_run, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(digits_run.path, path)
    stale = load_run(path)
    ctx = multiprocessing.get_context("spawn")
    with folder_lock(path):
        child = ctx.Process(target=_add_row, args=(str(path), "verified-child"))
        child.start()
        time.sleep(1.5)  # the child has loaded the Run and is blocked on the lock
        assert child.is_alive() and "verified-child" not in set(load_run(path).policies["name"])
        merge_policy_rows(stale, _row(stale, "verified-parent"))  # re-entrant: this thread holds the lock
    child.join(60)
    assert child.exitcode == 0
    names = list(load_run(path).policies["name"])
    assert {"verified-parent", "verified-child"} <= set(names)
    assert names[: len(digits_run.policies)] == list(digits_run.policies["name"])  # sweep rows first, unchanged


def test_sweep_rows_are_refreshed_and_verified_rows_kept(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, inputs=rng.normal(size=(96, 64)).astype(np.float32), labels=rng.integers(0, 10, 96))
    out = tmp_path / "r"
    run = analyze("factories:tiny_mlp", str(npz), out, progress=False, latency=False, verify_policies=0, random_policies=2)
    original = run.policies.copy()
    merge_policy_rows(run, _row(run, "verified-1"))
    merge_policy_rows(run, _row(run, "all-int8", kind="uniform"))  # a stale copy of a sweep row
    again = analyze("factories:tiny_mlp", str(npz), out, progress=False, latency=False, verify_policies=0, random_policies=2, resume=True)
    pol = again.policies
    assert list(pol["name"]) == list(original["name"]) + ["verified-1"]
    sweep = pol[pol["name"] != "verified-1"].reset_index(drop=True)
    pd.testing.assert_frame_equal(sweep, original.reset_index(drop=True))
