"""Editing the policy in a real browser: a click cycles a format cell, rows selected with the mouse or the keyboard
take a format from one key, Ctrl+Z / Ctrl+Shift+Z undo and redo, and the history compares two policies tried."""
from __future__ import annotations

import numpy as np
import pytest
from playwright.sync_api import expect

from analysis.api import FORMAT_CODE, Projector
from browser_support import TIMEOUT, click_format, save_screenshot, table_point, wait_formats
from test_journey import size_bytes, wait_ready
from test_policy_journey import open_layers, wait_quantized

pytestmark = pytest.mark.e2e


def wait_bytes(page, n: int) -> None:
    page.wait_for_function(
        "(want) => [...document.querySelectorAll('[data-testid=\"stMetric\"]')].some(m => m.innerText.includes(want))",
        arg=f"{n:,} B", timeout=TIMEOUT)
    wait_ready(page)


def test_click_select_keys_undo_and_history(browser, dashboard, digits_run):
    run, names = digits_run, digits_run.layer_names
    n, pj = len(names), Projector(digits_run)
    both = [i for i in range(n) if pj.allowed[i, FORMAT_CODE["int8"]] and pj.allowed[i, FORMAT_CODE["int4"]]]
    a, b, c = both[0], both[1], both[2]
    codes = np.zeros(n, dtype=np.int8)
    ctx, page = open_layers(browser, f"{dashboard}/layers")

    # a click on a format cell moves it along fp32 → int8 → int4 → fp32; the headline follows each click
    for fmt in ("int8", "int4"):
        assert click_format(page, a) == fmt
        codes[a] = FORMAT_CODE[fmt]
        wait_bytes(page, pj.project(codes).bytes)
    wait_quantized(page, f"1 / {n}")

    # a row's box (mouse) and Shift+Space on a focused row (keyboard) select; the key 8 sets both to INT8
    page.mouse.click(*table_point(page, b, "box"))
    expect(page.get_by_role("button", name="INT8 (1)")).to_be_visible(timeout=TIMEOUT)
    page.mouse.click(*table_point(page, b, "layer"))  # focus a cell: the grid takes the keys
    for _ in range(c - b):
        page.keyboard.press("ArrowDown")
    page.keyboard.press("Shift+Space")
    expect(page.get_by_role("button", name="INT8 (2)")).to_be_visible(timeout=TIMEOUT)
    page.keyboard.press("8")
    codes[[b, c]] = FORMAT_CODE["int8"]
    wait_quantized(page, f"3 / {n}")
    assert size_bytes(page) == pj.project(codes).bytes
    wait_formats(page, {a: "int4", b: "int8", c: "int8"})

    # undo and redo from the keyboard: one step each, the table and the headline follow
    page.keyboard.press("Control+z")
    wait_quantized(page, f"1 / {n}")
    wait_formats(page, {a: "int4", b: "fp32", c: "fp32"})
    page.keyboard.press("Control+Shift+z")
    wait_quantized(page, f"3 / {n}")

    # the policies tried: A (the one before) against B (the current one), and back to A
    page.get_by_text("Policies tried in this session").click()
    panel = page.get_by_test_id("stExpander").filter(has_text="Policies tried in this session")
    expect(panel).to_contain_text("2 × int8, 1 × int4 (current)", timeout=TIMEOUT)
    expect(panel).to_contain_text("2 layer(s) differ", timeout=TIMEOUT)
    wait_ready(page)
    save_screenshot(panel, "history")
    panel.get_by_role("button", name="Go back to A").click()
    wait_quantized(page, f"1 / {n}")
    codes[[b, c]] = 0
    assert size_bytes(page) == pj.project(codes).bytes
    assert not page.locator('[data-testid="stException"]').count()
    ctx.close()
