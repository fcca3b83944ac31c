"""Layout as a reader sees it in Chromium: no headline value cut at 1024 px, the Layers table without sideways
scrolling at 1400 px, histogram axes titled with the INT8 grid clear of their tick labels, no chart label over
another."""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from browser_support import TIMEOUT

pytestmark = pytest.mark.e2e

# elements inside a headline metric whose text is wider than the box that shows it (cut with "…")
CUT = """() => [...document.querySelectorAll('[data-testid="stMetric"] *')]
  .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)"""
# pairs of text boxes in one plotly chart that overlap (legend, axes, titles, point labels)
OVERLAPS = """(plot) => {
  const boxes = [...plot.querySelectorAll('text')].filter(t => t.textContent.trim())
    .map(t => [t.textContent, t.getBoundingClientRect()]).filter(([, r]) => r.width > 0 && r.height > 0);
  const out = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const [a, r] = boxes[i], [b, s] = boxes[j];
    const w = Math.min(r.right, s.right) - Math.max(r.left, s.left), h = Math.min(r.bottom, s.bottom) - Math.max(r.top, s.top);
    if (w > 1 && h > 1) out.push([a, b]);
  }
  return out;
}"""
# x tick labels of a histogram that a marker of the grid's rug covers
RUG_OVER_TICKS = """(plot) => {
  const ticks = [...plot.querySelectorAll('.xtick text')].map(t => t.getBoundingClientRect());
  const marks = [...plot.querySelectorAll('.xy2 .points path')].map(p => p.getBoundingClientRect());
  return marks.filter(m => ticks.some(t => Math.min(m.right, t.right) - Math.max(m.left, t.left) > 0
                                         && Math.min(m.bottom, t.bottom) - Math.max(m.top, t.top) > 0)).length;
}"""


def goto(page, url: str, heading: str) -> None:
    page.goto(url)
    expect(page.get_by_role("heading", name=heading, level=1)).to_be_visible(timeout=TIMEOUT)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=TIMEOUT)
    assert page.locator('[data-testid="stException"]').count() == 0, page.locator("body").inner_text()


def test_headline_values_are_whole_at_1024_px(browser, dashboard, digits_run):
    page = browser.new_page(viewport={"width": 1024, "height": 900})
    for path, heading in (("", f"Overview — {digits_run.meta['model']['name']}"), ("layers", "Layers"),
                          ("search", "Search")):
        goto(page, f"{dashboard}/{path}", heading)
        expect(page.locator('[data-testid="stMetric"]')).to_have_count(4, timeout=TIMEOUT)
        assert page.evaluate(CUT) == [], path
    page.context.close()


def test_the_layers_table_needs_no_sideways_scrolling_at_1400_px(browser, dashboard):
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    goto(page, f"{dashboard}/layers", "Layers")
    scroller = page.locator('[data-testid="stDataFrame"] .dvn-scroller')
    scroller.wait_for(timeout=TIMEOUT)
    wide, shown = scroller.evaluate("e => [e.scrollWidth, e.clientWidth]")
    assert wide <= shown, (wide, shown)
    page.context.close()


def test_histograms_have_axis_titles_and_the_grid_clear_of_tick_labels(browser, dashboard):
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    goto(page, f"{dashboard}/activations", "Activations")
    plots = page.locator(".js-plotly-plot")
    expect(plots.first).to_contain_text("Weight", timeout=TIMEOUT)
    rugs, channel_charts = 0, 0
    for i in range(plots.count()):
        plot = plots.nth(i)
        if "per output channel" in plot.locator(".gtitle").text_content():  # the channel chart: two panels
            assert "output channel" in plot.locator(".g-x2title").text_content()
            assert "weight value (FP32)" in plot.locator(".g-ytitle").text_content()
            assert plot.evaluate(OVERLAPS) == [], i
            channel_charts += 1
            continue
        assert "value (FP32)" in plot.locator(".g-xtitle").text_content()
        assert plot.evaluate(RUG_OVER_TICKS) == 0, plot.locator(".gtitle").text_content()
        rugs += plot.locator(".xy2 .points path").count()
        assert plot.evaluate(OVERLAPS) == [], i
    assert rugs  # an INT8 grid was drawn, so the check above looked at one
    assert channel_charts == 1  # the digits Run holds per-channel weight statistics
    page.context.close()


@pytest.mark.parametrize("width", [1024, 1400])
def test_search_charts_name_every_uniform_format_with_no_label_over_another(browser, dashboard, width):
    page = browser.new_page(viewport={"width": width, "height": 1400})
    goto(page, f"{dashboard}/search", "Search")
    plots = page.locator(".js-plotly-plot")
    expect(plots.first).to_contain_text("current policy (projected)", timeout=TIMEOUT)
    for i in range(plots.count()):
        plot = plots.nth(i)
        legend = plot.locator(".legend").text_content()
        assert "all-int8 (measured)" in legend and "all-int4 (measured)" in legend and "fp32 (measured)" in legend
        assert plot.evaluate(OVERLAPS) == [], (width, i)
    page.context.close()


def test_search_charts_keep_a_readable_plot_area_at_1024_px(browser, dashboard, digits_run):
    """Two frontier charts side by side left each a plot area of about 300 px at 1024 px: one per row now."""
    page = browser.new_page(viewport={"width": 1024, "height": 1400})
    goto(page, f"{dashboard}/search", "Search")
    plots = page.locator(".js-plotly-plot")
    expect(plots.first).to_contain_text("current policy (projected)", timeout=TIMEOUT)
    want = 2 if digits_run.meta.get("latency") else 1
    expect(plots).to_have_count(want, timeout=TIMEOUT)
    for i in range(want):
        width = plots.nth(i).locator(".nsewdrag").first.evaluate("e => e.getBoundingClientRect().width")
        assert width >= 450, (i, width)
    page.context.close()
