"""The Compare page in a real browser: `quantlens dashboard RUN_A RUN_B` serves both; the page draws
uniform results, per-layer sensitivity matched by name, and both frontiers."""
from __future__ import annotations

import pytest

from analysis.store.synthetic import synthetic_run
from browser_support import save_screenshot
from dashboard.serve import start_server, stop_server

pytestmark = pytest.mark.e2e
TIMEOUT = 30_000  # ms


@pytest.fixture
def two_runs_server(tmp_path):
    a = synthetic_run(tmp_path / "a", 16, seed=4)
    b = synthetic_run(tmp_path / "b", 10, seed=5)
    proc, url = start_server([str(a.path), str(b.path)])
    yield url
    stop_server(proc)


def test_compare_two_runs(browser, two_runs_server):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1800})
    page = ctx.new_page()
    page.goto(f"{two_runs_server}/compare")
    page.wait_for_selector('[data-testid="stMain"]', timeout=TIMEOUT)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=TIMEOUT)
    main = page.get_by_test_id("stMain")
    main.get_by_text("Compare Runs").wait_for(timeout=TIMEOUT)
    assert page.locator('[data-testid="stException"]').count() == 0
    # both charts drawn (each plotly chart holds several svg.main-svg: count the charts' texts, not svgs)
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')]"
                           ".some(p => (p.textContent || '').includes('Run B frontier (projected)'))", timeout=TIMEOUT)
    text = main.inner_text()
    assert "synthetic:16" in text and "synthetic:10" in text
    assert "10 layer(s) in both Runs" in text and "Only in Run A (6)" in text
    assert "Run B frontier (projected)" in page.locator(".js-plotly-plot").last.text_content()
    save_screenshot(main, "compare")
    ctx.close()


def test_download_report_open_a_bundle_then_compare(browser, tmp_path):
    """Export & share: the report downloads; a teammate's bundle opens; Compare shows both Runs."""
    from analysis.store.bundle import write_bundle

    mine = synthetic_run(tmp_path / "mine", 12, seed=6)
    theirs = synthetic_run(tmp_path / "theirs", 12, seed=7)
    bundle = write_bundle(theirs.path, tmp_path / "theirs.qlrun")
    proc, url = start_server([str(mine.path)])
    try:
        ctx = browser.new_context(viewport={"width": 1400, "height": 1800}, accept_downloads=True)
        page = ctx.new_page()
        page.goto(f"{url}/export")
        page.get_by_role("button", name="Download report (HTML)").wait_for(timeout=TIMEOUT)
        with page.expect_download(timeout=60_000) as dl:
            page.get_by_role("button", name="Download report (HTML)").click()
        html = open(dl.value.path(), encoding="utf-8").read()
        assert html.startswith("<!DOCTYPE html>") and "synthetic:12" in html and "from the dashboard" in html

        page.locator('[data-testid="stFileUploaderDropzoneInput"]').last.set_input_files(str(bundle))
        # the bundle's Run becomes the active one: the sidebar's caption shows its model hash
        page.wait_for_function("(sha) => document.body.innerText.includes(sha)", arg=theirs.model_sha256[:12],
                               timeout=TIMEOUT)
        assert page.locator('[data-testid="stException"]').count() == 0

        page.locator('[data-testid="stSidebarNav"] a', has_text="Compare").click()
        page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot svg.main-svg').length >= 2",
                               timeout=TIMEOUT)
        text = page.get_by_test_id("stMain").inner_text()
        assert "12 layer(s) in both Runs" in text and "Only in Run" not in text
        assert page.locator('[data-testid="stException"]').count() == 0
        ctx.close()
    finally:
        stop_server(proc)
