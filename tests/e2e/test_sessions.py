"""Two browser sessions on one dashboard edit different policies and never see each other's."""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from browser_support import set_format
from test_journey import TIMEOUT, size_bytes, table_formats, wait_ready

pytestmark = pytest.mark.e2e


def _open(browser, url):
    page = browser.new_context(viewport={"width": 1400, "height": 2400}).new_page()
    page.goto(f"{url}/layers")
    expect(page.get_by_role("heading", name="Layers", level=1)).to_be_visible(timeout=TIMEOUT)
    wait_ready(page)
    return page


def _set(page, row: int, fmt: str, want_bytes: int) -> None:
    set_format(page, row, fmt)
    page.wait_for_function(
        "(want) => [...document.querySelectorAll('[data-testid=\"stMetric\"]')].some(m => m.innerText.includes(want))",
        arg=f"{want_bytes:,} B", timeout=TIMEOUT)


def test_two_sessions_keep_their_own_policies(browser, dashboard, digits_run):
    names, bt = digits_run.layer_names, digits_run.bytes_table()
    fp32 = digits_run.meta["model"]["fp32_bytes"]
    a, b = _open(browser, dashboard), _open(browser, dashboard)
    want_a = fp32 + int(bt.loc[names[1], "int4"] - bt.loc[names[1], "fp32"])
    _set(a, 1, "int4", want_a)
    b.reload()  # a fresh rerun of the other session must not pick up A's edit
    wait_ready(b)
    assert table_formats(b, len(names)) == {n: "fp32" for n in names} and size_bytes(b) == fp32
    want_b = fp32 + int(bt.loc[names[4], "int8"] - bt.loc[names[4], "fp32"])
    _set(b, 4, "int8", want_b)
    a.reload()
    wait_ready(a)
    assert size_bytes(a) == want_a and size_bytes(b) == want_b
    assert table_formats(a, len(names)) == {n: ("int4" if i == 1 else "fp32") for i, n in enumerate(names)}
    assert table_formats(b, len(names)) == {n: ("int8" if i == 4 else "fp32") for i, n in enumerate(names)}
    a.context.close()
    b.context.close()
