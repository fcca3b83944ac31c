"""The current policy in a real browser: a revert in the table, navigation and a reload, a share link opened on
a server that opened its Runs in another order. The table, the headline, the address and the policy file agree."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from playwright.sync_api import expect

from analysis.store.policy import encode_codes
from analysis.store.synthetic import synthetic_run
from browser_support import FOREIGN, TIMEOUT, set_format
from dashboard.serve import start_server, stop_server
from test_journey import open_page, size_bytes, table_formats, wait_ready

pytestmark = pytest.mark.e2e


def quantized(page) -> str:
    text = page.locator('[data-testid="stMetric"]', has_text="Layers quantized").inner_text(timeout=TIMEOUT)
    return re.search(r"(\d+ / \d+)", text).group(1)


def wait_quantized(page, want: str) -> None:
    page.wait_for_function(
        "(want) => [...document.querySelectorAll('[data-testid=\"stMetric\"]')].some("
        "m => m.innerText.includes('Layers quantized') && m.innerText.includes(want))", arg=want, timeout=TIMEOUT)
    wait_ready(page)


def wait_token(page, token: str) -> None:
    page.wait_for_function("(t) => new URLSearchParams(location.search).get('p') === t", arg=token, timeout=TIMEOUT)


def downloaded_policy(page) -> dict:
    with page.expect_download(timeout=TIMEOUT) as dl:
        page.get_by_role("button", name="Download policy JSON").click()
    return json.loads(open(dl.value.path(), encoding="utf-8").read())


def open_layers(browser, url: str, viewport_height: int = 2400):
    ctx = browser.new_context(viewport={"width": 1400, "height": viewport_height}, accept_downloads=True)
    page = ctx.new_page()
    page.goto(url)
    expect(page.get_by_role("heading", name="Layers", level=1)).to_be_visible(timeout=TIMEOUT)
    wait_ready(page)
    return ctx, page


def int4_rows(run) -> list[int]:
    s = run.sensitivity
    ok = set(s[(s.format == "int4") & (s.status == "ok")]["layer"])
    return [i for i, n in enumerate(run.layer_names) if n in ok]


def test_a_revert_brings_headline_address_and_file_back_to_fp32(browser, dashboard, digits_run):
    run, names = digits_run, digits_run.layer_names
    fp32_bytes, n = run.meta["model"]["fp32_bytes"], len(names)
    fp32_token = encode_codes(np.zeros(n, dtype=np.int8), run.model_sha256)
    ctx, page = open_layers(browser, f"{dashboard}/layers")
    a, b = int4_rows(run)[:2]
    for row, fmt in ((a, "int4"), (b, "int8"), (a, "int8")):
        set_format(page, row, fmt)
        wait_quantized(page, f"1 / {n}")
        assert table_formats(page, n)[names[row]] == fmt
        assert size_bytes(page) < fp32_bytes
        set_format(page, row, "fp32")  # back to the value the table was given
        wait_quantized(page, f"0 / {n}")
        assert table_formats(page, n) == {x: "fp32" for x in names}
        assert size_bytes(page) == fp32_bytes
        wait_token(page, fp32_token)
    open_page(page, "Export & share", "Export & share")
    assert downloaded_policy(page)["layers"] == {x: "fp32" for x in names}
    expect(page.get_by_test_id("stMain")).to_contain_text("Current policy: FP32 7, INT8 0, INT4 0")
    ctx.close()


def test_the_policy_survives_navigation_and_a_reload(browser, dashboard, digits_run):
    run, names = digits_run, digits_run.layer_names
    n = len(names)
    row = int4_rows(run)[0]
    codes = np.zeros(n, dtype=np.int8)
    codes[row] = 2
    token = encode_codes(codes, run.model_sha256)
    want = {x: ("int4" if i == row else "fp32") for i, x in enumerate(names)}
    ctx, page = open_layers(browser, f"{dashboard}/layers")
    set_format(page, row, "int4")
    wait_quantized(page, f"1 / {n}")
    wait_token(page, token)
    run_id = dict(re.findall(r"([a-z]+)=([^&]+)", page.url.split("?", 1)[1]))["run"]
    assert not run_id.isdigit()

    for title in ("Overview", "Search", "Activations", "Export & share"):  # every sidebar link keeps the policy
        open_page(page, title, title if title != "Overview" else f"Overview — {run.meta['model']['name']}")
        wait_token(page, token)
        assert f"run={run_id}" in page.url
    expect(page.get_by_test_id("stMain")).to_contain_text("address bar holds the same policy", timeout=TIMEOUT)
    share = page.locator('[data-testid="stCode"]', has_text="p=q1.").inner_text().strip()
    assert share.endswith(f"/layers?run={run_id}&p={token}")

    page.reload()  # a new session: the address is all it has
    expect(page.get_by_role("heading", name="Export & share", level=1)).to_be_visible(timeout=TIMEOUT)
    wait_ready(page)
    wait_token(page, token)
    assert downloaded_policy(page)["layers"] == want
    open_page(page, "Layers", "Layers")
    wait_token(page, token)
    assert table_formats(page, n) == want and quantized(page) == f"1 / {n}"

    page.go_back()  # to Export & share: the address still names the policy on screen
    expect(page.get_by_role("heading", name="Export & share", level=1)).to_be_visible(timeout=TIMEOUT)
    wait_ready(page)
    wait_token(page, token)
    ctx.close()


@pytest.fixture
def other_order_server(digits_run, tmp_path):
    """A second server with another Run opened first: the demo Run is the second one there."""
    other = synthetic_run(tmp_path / "syn", 12, seed=3)
    proc, url = start_server([str(other.path), str(digits_run.path)])
    yield url
    stop_server(proc)


def test_a_share_link_opens_the_same_run_on_a_server_that_opened_the_runs_in_another_order(
        browser, dashboard, other_order_server, digits_run):
    run, names = digits_run, digits_run.layer_names
    n = len(names)
    rows = int4_rows(run)[:2]
    ctx, page = open_layers(browser, f"{dashboard}/layers")
    for r in rows:
        set_format(page, r, "int4")
    wait_quantized(page, f"2 / {n}")
    want, want_bytes = table_formats(page, n), size_bytes(page)
    open_page(page, "Export & share", "Export & share")
    share = page.locator('[data-testid="stCode"]', has_text="p=q1.").inner_text().strip()
    ctx.close()

    there = share.replace(dashboard, other_order_server)
    ctx, page = open_layers(browser, there)
    assert not page.locator('[data-testid="stAlert"]', has_text="not applied").count()
    expect(page.locator('[data-testid="stSidebar"]')).to_contain_text(run.model_sha256[:12])
    assert table_formats(page, n) == want and size_bytes(page) == want_bytes
    assert page.url.split("?", 1)[1] == share.split("?", 1)[1]
    ctx.close()


def test_a_request_off_this_machine_is_caught(browser):
    """The guard every test here runs under: a page that asks another host is recorded (and refused)."""
    ctx = browser.new_context()
    page = ctx.new_page()
    page.set_content('<img src="http://192.0.2.1/icon.svg">')
    page.wait_for_timeout(500)
    caught = list(FOREIGN)
    FOREIGN.clear()
    ctx.close()
    assert caught == ["http://192.0.2.1/icon.svg"]
