"""The Run lock (analysis.store.atomic.folder_lock): exclusive across threads, re-entrant within one.

Exclusion across processes is tested in tests/test_policy_rows.py."""
from __future__ import annotations

import os
import threading

from analysis.store.atomic import folder_lock

WAIT_S = 30  # a deadlock fails the test after this instead of hanging it


def _in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_another_thread_waits_until_the_lock_is_released(tmp_path):
    events: list[str] = []
    holding, try_now = threading.Event(), threading.Event()

    def holder():
        with folder_lock(tmp_path):
            holding.set()
            try_now.wait(WAIT_S)
            # the other thread has asked for the lock; it must not get it while this block runs
            waiter.join(0.5)
            events.append("holder leaves")

    def wait_for_lock():
        holding.wait(WAIT_S)
        try_now.set()
        with folder_lock(tmp_path):
            events.append("waiter enters")

    waiter = _in_thread(wait_for_lock)
    h = _in_thread(holder)
    h.join(WAIT_S)
    waiter.join(WAIT_S)
    assert not h.is_alive() and not waiter.is_alive()
    assert events == ["holder leaves", "waiter enters"]


def test_re_entrant_within_a_thread_under_any_spelling_of_the_folder(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    os.symlink(tmp_path / "run", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    done = []

    def nested():
        with folder_lock(tmp_path / "run"):
            with folder_lock("run"):
                with folder_lock(tmp_path / "link"):
                    done.append(True)

    t = _in_thread(nested)
    t.join(WAIT_S)
    assert done == [True], "a nested lock on the same folder deadlocked"
    with folder_lock(tmp_path / "run"):  # released at the end of the block: taken again at once
        pass
