"""The HTML report in Chromium, opened from a file with the network blocked: charts draw, a toggle
recomputes the projection (to the number Python gives), no request leaves the page, no name runs as code."""
from __future__ import annotations

import numpy as np
import pytest

from analysis.store.policy import FORMAT_CODE
from analysis.project.projection import Projector
from analysis.report.render import write_report
from browser_support import save_screenshot

pytestmark = pytest.mark.e2e
TIMEOUT = 30_000  # ms


def open_offline(browser, path):
    """A page on ``file://path`` where every other request is aborted and recorded."""
    ctx = browser.new_context(viewport={"width": 1300, "height": 1000})
    blocked, errors = [], []
    ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://")
              else (blocked.append(route.request.url), route.abort()))
    page = ctx.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=TIMEOUT)
    return ctx, page, requests, blocked, errors


def test_report_offline_charts_and_toggle(browser, digits_run, tmp_path):
    out = write_report(digits_run, tmp_path / "report.html")
    ctx, page, requests, blocked, errors = open_offline(browser, out)
    assert not errors
    # every chart drew an SVG
    for fig in ("fig-sensitivity", "fig-frontier", "fig-validation", "fig-hist-0"):
        page.wait_for_selector(f"#{fig} svg.main-svg", timeout=TIMEOUT)
    assert "Loss change" in page.locator("#fig-sensitivity").text_content()

    pj = Projector(digits_run)
    names = pj.names
    selects = page.locator("select.ql-fmt")
    codes = [FORMAT_CODE[selects.nth(i).input_value()] for i in range(len(names))]
    size_before = page.locator("#ql-bytes").text_content()
    assert f"{pj.project(np.array(codes)).bytes:,} B" in size_before

    # toggle: the layer with the most bytes goes to a format it was not in
    row = int(np.argmax(pj.bytes[:, 0]))
    new = next(k for k in (0, 1, 2) if k != codes[row] and pj.allowed[row, k])
    selects.nth(row).select_option(["fp32", "int8", "int4"][new])
    codes[row] = new
    want = pj.project(np.array(codes))
    page.wait_for_function("(t) => document.getElementById('ql-bytes').textContent.startsWith(t)",
                           arg=f"{want.bytes:,} B", timeout=TIMEOUT)
    assert page.locator("#ql-bytes").text_content() != size_before
    assert page.locator("#ql-metric").text_content() == f"{want.metric * 100:.2f} %"
    assert "1 layer(s) changed" in page.locator("#ql-changed").text_content()
    assert f'"{names[row]}": "{["fp32", "int8", "int4"][new]}"' in page.locator("#ql-policy-json").text_content()
    # the frontier's "policy shown" point moved with it
    shown_x = page.evaluate("() => { const d = document.getElementById('fig-frontier').data; "
                            "return d[d.length - 1].x[0]; }")
    assert shown_x == pytest.approx(want.bytes / 1e6)

    save_screenshot(page.locator("main"), "report")
    assert not blocked, blocked
    assert all(u.startswith("file://") for u in requests), requests
    assert not errors
    ctx.close()


def test_report_hostile_names_stay_text(browser, tmp_path):
    from analysis.store.synthetic import synthetic_run
    from test_report_html import HOSTILE, hostile_run

    syn = synthetic_run(tmp_path / "syn", 12, seed=2)
    out = write_report(hostile_run(syn.path, tmp_path / "hostile"), tmp_path / "hostile.html")
    ctx, page, requests, blocked, errors = open_offline(browser, out)
    page.wait_for_selector("#fig-sensitivity svg.main-svg", timeout=TIMEOUT)
    assert page.evaluate("() => window.__pwned") is None
    assert page.locator("#ql-layers tbody tr").first.locator("td").nth(1).text_content() == HOSTILE[0]
    assert page.locator("img").count() == 0
    assert not blocked and not errors
    ctx.close()
