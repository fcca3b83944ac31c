"""Verify in a real browser: the background job is polled by a fragment until it ends, then the whole page
(and the Overview chart) shows the measured point read back from the Run on disk."""
from __future__ import annotations

import shutil

import pytest
from playwright.sync_api import expect

from analysis.store.run import load_run
from dashboard.serve import start_server, stop_server

pytestmark = pytest.mark.e2e
TIMEOUT = 30_000  # ms


def test_verify_runs_in_the_background_and_the_measured_point_appears(browser, digits_run, tmp_path):
    run_dir = tmp_path / "digits"  # a private copy: verify rewrites the Run's policies table
    shutil.copytree(digits_run.path, run_dir, ignore=shutil.ignore_patterns("jobs"))
    proc, url = start_server([str(run_dir)])
    try:
        ctx = browser.new_context(viewport={"width": 1400, "height": 1800})
        page = ctx.new_page()
        page.goto(f"{url}/export")
        button = page.get_by_role("button", name="Verify (measure in onnxruntime)")
        expect(button).to_be_enabled(timeout=TIMEOUT)
        button.click()
        main = page.get_by_test_id("stMain")
        expect(main.get_by_text("Verified in")).to_be_visible(timeout=90_000)  # polled, then a full rerun
        assert page.locator('[data-testid="stException"]').count() == 0
        pol = load_run(run_dir).policies
        assert (pol["kind"] == "user").sum() == 1 and pol[pol["kind"] == "user"]["measured_on"].iloc[0].startswith("onnxruntime")
        page.locator('[data-testid="stSidebarNav"] a', has_text="Overview").click()
        expect(page.locator(".js-plotly-plot").first).to_contain_text("verified in onnxruntime (measured)",
                                                                       timeout=TIMEOUT)
        assert page.locator('[data-testid="stException"]').count() == 0
        ctx.close()
    finally:
        stop_server(proc)
