"""The Model view in a real browser: a click on a layer's mark changes its format once; a second click on the
same layer changes it again; the headline and the address follow. Draws the README's picture of the view."""
from __future__ import annotations

import re

import numpy as np
import pytest
from playwright.sync_api import expect

from analysis.store.policy import encode_codes
from browser_support import TIMEOUT, save_screenshot
from test_journey import wait_ready

pytestmark = pytest.mark.e2e

MARKER_XY = """(label) => {
  for (const gd of document.querySelectorAll('.js-plotly-plot')) {
    for (const tr of gd._fullData) {
      const k = Array.from(tr.text || []).findIndex(t => String(t).trim() === label);
      if (k < 0) continue;
      const L = gd._fullLayout, box = gd.getBoundingClientRect();
      return [box.left + L.xaxis._offset + L.xaxis.l2p(tr.x[k]), box.top + L.yaxis._offset + L.yaxis.l2p(tr.y[k])];
    }
  }
  return null;
}"""


def click_layer(page, label: str) -> None:
    """Click the marker drawn with text ``label`` (e.g. ``conv2 · FP32``), found by its data coordinates."""
    page.wait_for_function(f"() => ({MARKER_XY})({label!r}) !== null", timeout=TIMEOUT)
    x, y = page.evaluate(MARKER_XY, label)
    page.mouse.click(x, y)


def wait_headline(page, want: str) -> None:
    page.wait_for_function(
        "(want) => [...document.querySelectorAll('[data-testid=\"stMetric\"]')].some("
        "m => m.innerText.includes('Layers quantized') && m.innerText.includes(want))", arg=want, timeout=TIMEOUT)


def test_clicking_a_layer_in_the_model_view(browser, dashboard, digits_run):
    run, names = digits_run, digits_run.layer_names
    n = len(names)
    s = run.sensitivity
    row = next(i for i, nm in enumerate(names)
               if set(s[(s.layer == nm) & (s.status == "ok")]["format"]) >= {"int8", "int4"})
    short = names[row]  # digits' layers are top-level: the label is the name
    ctx = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = ctx.new_page()
    page.goto(f"{dashboard}/model")
    expect(page.get_by_role("heading", name="Model", level=1)).to_be_visible(timeout=TIMEOUT)
    wait_ready(page)
    wait_headline(page, f"0 / {n}")
    for label, want, fmt in ((f"{short} · FP32", 1, "INT8"), (f"{short} · INT8", 2, "INT4")):
        click_layer(page, label)
        wait_headline(page, f"{fmt} 1")
        codes = np.zeros(n, dtype=np.int8)
        codes[row] = want
        page.wait_for_function("(t) => new URLSearchParams(location.search).get('p') === t",
                               arg=encode_codes(codes, run.model_sha256), timeout=TIMEOUT)
        page.wait_for_function(f"() => ({MARKER_XY})({f'{short} · {fmt}'!r}) !== null", timeout=TIMEOUT)
        wait_ready(page)
    assert re.search(rf"1 / {n}", page.locator('[data-testid="stMetric"]', has_text="Layers quantized").inner_text())
    page.mouse.move(5, 5)  # no hover label in the picture
    page.wait_for_timeout(300)
    save_screenshot(page.get_by_test_id("stMainBlockContainer"), "model")
    ctx.close()
