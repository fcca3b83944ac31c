"""``quantlens demo``'s first screen in a real browser: a Run being analysed fills in by itself, and once
complete it is offered to the session on digits and is where a new session opens.

The writer is this test process, through the lock and note a background demo analysis holds
(``analysis.store.writer``); the Run it "writes" is a small synthetic one, so this takes seconds.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Error as PlaywrightError, expect

from analysis.store.run import load_run, replace_table, update_meta
from analysis.store.synthetic import synthetic_run
from analysis.store.writer import hold_writer
from browser_support import TIMEOUT
from dashboard.serve import start_server, stop_server

pytestmark = pytest.mark.e2e


def _partial(path: Path, whole, measured: int) -> None:
    """The Run at ``path`` as a sweep leaves it with the first ``measured`` layers done."""
    run = load_run(path) if (path / "run.json").exists() else synthetic_run(path, 12, seed=2, n_random=0)
    sens = whole.sensitivity.copy()
    pending = sens.index[~sens["layer"].isin(whole.layer_names[:measured])]
    sens.loc[pending, ["status", "reason"]] = ["pending", "not measured yet"]
    sens.loc[pending, ["metric", "metric_delta", "loss", "loss_delta", "kl"]] = float("nan")
    replace_table(run, "sensitivity", sens)
    update_meta(run, status="partial", progress={"done": 2 * measured, "total": 24})


def _open(page, button: str, heading: str, exact: bool = False) -> None:
    """Click ``button`` until the page shows ``heading``: a click that lands while the 3 s progress refresh
    redraws the box can be lost (the button is drawn anew under the pointer), and a reader clicks again."""
    want = page.get_by_role("heading", name=heading, level=1)
    for _ in range(3):
        try:
            page.get_by_role("button", name=button, exact=exact).click(timeout=5_000)
            expect(want).to_be_visible(timeout=10_000)
            return
        except (AssertionError, PlaywrightError):
            if want.is_visible():
                return
    expect(want).to_be_visible(timeout=TIMEOUT)


def _box(page, text: str):
    return page.get_by_test_id("stAlert").filter(has_text=text)


def test_a_run_being_analysed_fills_in_and_is_offered_when_done(browser, tmp_path, digits_run):
    minilm, whole = tmp_path / "minilm", synthetic_run(tmp_path / "whole", 12, seed=2, n_random=0)
    writer = hold_writer(minilm, "test")
    writer.__enter__()
    proc, url = start_server([str(minilm), str(digits_run.path)])
    try:
        page = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        page.goto(url)
        expect(page.get_by_role("heading", name="Overview — demo:digits", level=1)).to_be_visible(timeout=TIMEOUT)
        expect(_box(page, "loading the model")).to_be_visible(timeout=TIMEOUT)
        _partial(minilm, whole, 3)  # no click, no reload: the box follows the folder
        expect(_box(page, "3 of 12 layers")).to_be_visible(timeout=TIMEOUT)
        _partial(minilm, whole, 9)
        expect(_box(page, "9 of 12 layers")).to_be_visible(timeout=TIMEOUT)

        follow = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        follow.goto(url)
        _open(follow, "Open synthetic:12 now (partial)", "Overview — synthetic:12")
        expect(follow.get_by_text("Partial: 9 of 12 layers measured so far")).to_be_visible(timeout=TIMEOUT)
        _partial(minilm, whole, 11)  # the page showing the partial Run redraws itself with the new layers
        expect(follow.get_by_text("Partial: 11 of 12 layers measured so far")).to_be_visible(timeout=TIMEOUT)

        replace_table(load_run(minilm), "sensitivity", whole.sensitivity)
        update_meta(load_run(minilm), status="complete", progress={"done": 24, "total": 24})
        writer.__exit__(None, None, None)
        writer = None
        expect(_box(page, "is analysed")).to_be_visible(timeout=TIMEOUT)  # offered, not switched to
        expect(page.get_by_role("heading", name="Overview — demo:digits", level=1)).to_be_visible(timeout=TIMEOUT)
        _open(page, "Open synthetic:12", "Overview — synthetic:12", exact=True)

        fresh = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        fresh.goto(url)
        expect(fresh.get_by_role("heading", name="Overview — synthetic:12", level=1)).to_be_visible(timeout=TIMEOUT)
    finally:
        if writer is not None:
            writer.__exit__(None, None, None)
        stop_server(proc)
