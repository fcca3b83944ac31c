"""The user journey in a real browser: open the demo Run, switch a layer to INT4, share, download."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from playwright.sync_api import expect

from analysis.store.policy import encode_codes
from browser_support import save_screenshot, set_format

pytestmark = pytest.mark.e2e
TIMEOUT = 30_000  # ms


def wait_ready(page) -> None:
    """The page is drawn, the script has finished, and it raised nothing."""
    page.wait_for_selector('[data-testid="stMain"]', timeout=TIMEOUT)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=TIMEOUT)
    assert page.locator('[data-testid="stException"]').count() == 0, page.locator("body").inner_text()


def size_bytes(page) -> int:
    text = page.locator('[data-testid="stMetric"]', has_text="Projected size").inner_text(timeout=TIMEOUT)
    return int(re.search(r"([\d,]+) B", text).group(1).replace(",", ""))


def table_formats(page, n_layers: int) -> dict[str, str]:
    """Layer -> format as the grid shows it (read from the grid's accessible cells; column 0 holds the row boxes)."""
    page.wait_for_selector('[data-testid="glide-cell-2-0"]', state="attached", timeout=TIMEOUT)
    out = {}
    for r in range(n_layers):
        name = page.get_by_test_id(f"glide-cell-1-{r}").first.text_content()
        out[name] = page.get_by_test_id(f"glide-cell-2-{r}").first.text_content()
    return out


def open_page(page, name: str, heading: str) -> None:
    page.locator('[data-testid="stSidebarNav"] a', has_text=name).click()
    expect(page.get_by_role("heading", name=heading, level=1)).to_be_visible(timeout=TIMEOUT)
    wait_ready(page)


def test_toggle_share_and_download(browser, dashboard, digits_run):
    run = digits_run
    names = run.layer_names
    sens = run.sensitivity
    int4_ok = set(sens[(sens.format == "int4") & (sens.status == "ok")]["layer"])
    row = next(i for i, n in enumerate(names) if n in int4_ok)
    layer = names[row]
    bt = run.bytes_table()

    ctx = browser.new_context(viewport={"width": 1400, "height": 2400}, accept_downloads=True)
    page = ctx.new_page()
    page.goto(f"{dashboard}/layers")
    expect(page.get_by_role("heading", name="Layers", level=1)).to_be_visible(timeout=TIMEOUT)
    wait_ready(page)
    assert table_formats(page, len(names)) == {n: "fp32" for n in names}
    before = size_bytes(page)
    assert before == run.meta["model"]["fp32_bytes"]

    # switch one layer to INT4 in the table: click its format cell until it reads int4 (fp32 → int8 → int4)
    set_format(page, row, "int4")
    want = before + int(bt.loc[layer, "int4"] - bt.loc[layer, "fp32"])
    page.wait_for_function(
        "(want) => [...document.querySelectorAll('[data-testid=\"stMetric\"]')].some("
        "m => m.innerText.includes(want))", arg=f"{want:,} B", timeout=TIMEOUT)
    assert size_bytes(page) == want
    shown = table_formats(page, len(names))
    assert shown == {n: ("int4" if n == layer else "fp32") for n in names}
    codes = np.zeros(len(names), dtype=np.int8)
    codes[row] = 2
    token = encode_codes(codes, run.model_sha256)
    page.wait_for_function("(t) => location.search.includes(t)", arg=token, timeout=TIMEOUT)  # the address bar
    save_screenshot(page.get_by_test_id("stMainBlockContainer"), "layers")

    # the policy file matches the table
    open_page(page, "Export & share", "Export & share")
    with page.expect_download(timeout=TIMEOUT) as dl:
        page.get_by_role("button", name="Download policy JSON").click()
    policy = json.loads(open(dl.value.path(), encoding="utf-8").read())
    assert policy["schema"] == "quantlens.policy/1" and policy["default"] == "fp32"
    assert policy["model"]["sha256"] == run.model_sha256
    assert policy["layers"] == shown
    code = page.locator('[data-testid="stCode"]', has_text="http")
    expect(code).to_contain_text("p=q1.", timeout=TIMEOUT)
    share = code.inner_text().strip()
    assert share.startswith(dashboard) and share.endswith(f"p={token}")
    save_screenshot(page.get_by_test_id("stMainBlockContainer"), "export")

    # the share URL in a fresh browser context restores the same policy
    fresh = browser.new_context(viewport={"width": 1400, "height": 2400}).new_page()
    fresh.goto(share)
    expect(fresh.get_by_role("heading", name="Layers", level=1)).to_be_visible(timeout=TIMEOUT)
    wait_ready(fresh)
    assert table_formats(fresh, len(names)) == shown
    assert size_bytes(fresh) == want
    fresh.context.close()

    open_page(page, "Overview", f"Overview — {run.meta['model']['name']}")
    expect(page.locator(".js-plotly-plot").first).to_contain_text("current policy (projected)", timeout=TIMEOUT)
    save_screenshot(page.get_by_test_id("stMainBlockContainer"), "overview")

    open_page(page, "Search", "Search")
    expect(page.locator(".js-plotly-plot").first).to_contain_text("all-int4 (measured)", timeout=TIMEOUT)
    save_screenshot(page.get_by_test_id("stMainBlockContainer"), "search")

    open_page(page, "Activations", "Activations")
    expect(page.locator(".js-plotly-plot").first).to_contain_text("Weight", timeout=TIMEOUT)
    save_screenshot(page.get_by_test_id("stMainBlockContainer"), "activations")
    ctx.close()
