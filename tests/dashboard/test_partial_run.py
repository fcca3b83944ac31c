"""A Run still being analysed (``quantlens demo``'s MiniLM): shown filling in, opened once it is done.

The writer is this test process, through the same lock and note the demo's background process holds
(``analysis.store.writer.hold_writer``), so the dashboard sees a live writer exactly as it would.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.store.run import load_run, replace_table, update_meta
from analysis.store.synthetic import synthetic_run
from analysis.store.writer import hold_writer
from dashboard import state

PAGES = ("overview", "layers", "search", "activations", "export")


@pytest.fixture
def runs(tmp_path) -> dict[str, str]:
    """A complete small Run ("digits") and the folder where "minilm" will be written, served MiniLM first
    as ``quantlens demo`` serves them."""
    synthetic_run(tmp_path / "digits", 8, seed=3)
    return {"minilm": str(tmp_path / "minilm"), "digits": str(tmp_path / "digits")}


def _make_partial(path: str, done: int, total: int = 24) -> None:
    """A 12-layer Run whose sweep measured the first ``done // 2`` layers."""
    whole = synthetic_run(Path(path).with_name(f"whole-{done}"), 12, seed=2, n_random=0)
    run = load_run(path) if Path(path, "run.json").exists() else synthetic_run(Path(path), 12, seed=2, n_random=0)
    sens = whole.sensitivity.copy()
    measured = set(run.layer_names[: done // 2])
    pending = sens.index[~sens["layer"].isin(measured)]
    sens.loc[pending, ["status", "reason"]] = ["pending", "not measured yet"]
    sens.loc[pending, ["metric", "metric_delta", "loss", "loss_delta", "kl"]] = float("nan")
    replace_table(run, "sensitivity", sens)
    update_meta(run, status="partial", progress={"done": done, "total": total})


def _boxes(at) -> list[str]:
    return [b.value for b in at.info if "being analysed" in b.value]


def test_a_folder_not_written_yet_shows_its_analysis_not_an_error(app, runs):
    with hold_writer(runs["minilm"], "test"):
        at = app([runs["minilm"], runs["digits"]])
        assert not at.exception and not at.error
        assert at.session_state[state.ACTIVE] == 1  # opens on the Run that is there
        box = _boxes(at)[0]
        assert "loading the model" in box and "opens here when done" in box
        assert "minilm (being analysed)" in at.sidebar.selectbox[0].options
        for page in PAGES:  # the folder itself, picked: its progress, on every page
            at = app([runs["minilm"], runs["digits"]], page)
            at.session_state[state.ACTIVE] = 0
            at.run()
            assert not at.exception and not at.error, page
            assert "loading the model" in _boxes(at)[0]
            assert not [e for e in at.error if "cannot be opened" in e.value]


def test_a_partial_run_being_written_shows_what_is_measured_and_follows_it(app, runs):
    _make_partial(runs["minilm"], 6)
    with hold_writer(runs["minilm"], "test"):
        at = app([runs["minilm"], runs["digits"]])
        at.button(key=state.watch_button_key(str(Path(runs["minilm"]).resolve()))).click().run()
        assert not at.exception and at.session_state[state.ACTIVE] == 0
        assert "**3 of 12 layers** measured (6 of 24 sweep jobs)" in _boxes(at)[0]
        assert "This page follows it" in _boxes(at)[0]
        assert any(c.value.startswith("Partial: 3 of 12 layers") for c in at.caption)  # the projection says so
        assert not [w for w in at.warning if "--resume" in w.value]  # not "stopped": it is being written
        _make_partial(runs["minilm"], 14)  # the sweep moves on
        at.run()
        assert "**7 of 12 layers** measured (14 of 24 sweep jobs)" in _boxes(at)[0]
        assert any(c.value.startswith("Partial: 7 of 12 layers") for c in at.caption)
        for page in PAGES:  # every page draws the partial Run under its progress box
            at = app([runs["minilm"], runs["digits"]], page)
            at.session_state[state.ACTIVE] = 0
            at.run()
            assert not at.exception and not at.error, page
            assert "**7 of 12 layers**" in _boxes(at)[0], page


def test_a_fresh_session_opens_the_completed_run_and_a_link_still_wins(app, runs):
    synthetic_run(Path(runs["minilm"]), 12, seed=2)
    with hold_writer(runs["minilm"], "test"):  # complete, but its latency is still being measured
        at = app([runs["minilm"], runs["digits"]])
        assert at.session_state[state.ACTIVE] == 1
    at = app([runs["minilm"], runs["digits"]])
    assert at.session_state[state.ACTIVE] == 0 and not _boxes(at)
    meta = json.loads(Path(runs["digits"], "run.json").read_text())
    digits_id = f"{meta['model']['sha256'][:12]}-{''.join(c for c in str(meta['created']) if c.isdigit())[:14]}"
    at = app([runs["minilm"], runs["digits"]], query={"run": digits_id})
    assert at.session_state[state.ACTIVE] == 1


def test_a_session_on_another_run_is_offered_the_finished_run_not_moved_to_it(app, runs):
    _make_partial(runs["minilm"], 6)
    writer = hold_writer(runs["minilm"], "test")
    writer.__enter__()
    try:
        at = app([runs["minilm"], runs["digits"]])
        assert at.session_state[state.ACTIVE] == 1
    finally:
        writer.__exit__(None, None, None)
    run = load_run(runs["minilm"])
    replace_table(run, "sensitivity", synthetic_run(Path(runs["minilm"]).with_name("whole"), 12, seed=2).sensitivity)
    update_meta(run, status="complete", progress={"done": 24, "total": 24})
    at.run()
    assert not at.exception and at.session_state[state.ACTIVE] == 1  # still where the user is
    done = [s.value for s in at.success if "is analysed" in s.value]
    assert done and not _boxes(at)
    key = state.watch_button_key(str(Path(runs["minilm"]).resolve()))
    at.button(key=key).click().run()
    assert at.session_state[state.ACTIVE] == 0
    assert at.title[0].value.startswith("Overview — ") and not [s for s in at.success if "is analysed" in s.value]
    at.run()  # once opened, the notice is gone for good
    assert not [s for s in at.success if "is analysed" in s.value]
