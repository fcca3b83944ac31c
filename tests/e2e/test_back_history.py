"""Back after two policies chosen on one page: the address, the headline and the policy agree afterwards.

Back pops the browser to the previous address (the first policy's link); the session's policy is the one
source of truth, so the page keeps the policy on screen and writes it back into the address at once (undo
is the way back to a previous policy). Before, the address could be left naming another policy than the page.
"""
from __future__ import annotations

import pytest
from playwright.sync_api import expect

from analysis.project.projection import Projector
from analysis.project.search import best_policy
from analysis.store.policy import decode_url_token, encode_codes
from browser_support import TIMEOUT
from test_journey import size_bytes, wait_ready
from test_policy_journey import wait_token

pytestmark = pytest.mark.e2e


def apply_budget(page, mb: float) -> None:
    box = page.get_by_role("spinbutton", name="Max size (MB)")
    box.fill(f"{mb:.3f}")
    box.press("Tab")
    page.get_by_role("button", name="Find the best policy and apply it").click()


def test_back_after_two_searches_leaves_address_and_page_agreeing(browser, dashboard, digits_run):
    pj = Projector(digits_run)
    budgets = [pj.fp32_bytes * 0.6 / 1e6, pj.fp32_bytes * 0.3 / 1e6]
    # slower policies allowed: which ones run slower than FP32 depends on this machine's CPU
    want = [best_policy(pj, max_bytes=round(b, 3) * 1e6, allow_slower=True) for b in budgets]
    assert not (want[0].codes == want[1].codes).all()  # two different policies, so Back has one to go to
    tokens = [encode_codes(w.codes, digits_run.model_sha256) for w in want]
    ctx = browser.new_context(viewport={"width": 1400, "height": 1600})
    page = ctx.new_page()
    page.goto(f"{dashboard}/search")
    expect(page.get_by_role("heading", name="Search", level=1)).to_be_visible(timeout=TIMEOUT)
    wait_ready(page)
    page.get_by_text("Allow policies projected slower than FP32").click()
    for b, t in zip(budgets, tokens):
        apply_budget(page, b)
        wait_token(page, t)
        wait_ready(page)
    page.evaluate("() => addEventListener('popstate', () => window.__popped = location.search)")
    page.go_back()
    page.wait_for_function("() => window.__popped !== undefined", timeout=TIMEOUT)
    popped = page.evaluate("window.__popped")
    assert tokens[0] in popped  # Back did go to the first policy's address ...
    wait_token(page, tokens[1])  # ... which the page then set back to the policy it shows
    wait_ready(page)
    shown = size_bytes(page)
    url_codes = decode_url_token(page.evaluate("new URLSearchParams(location.search).get('p')"), digits_run).codes
    assert shown == pj.project(url_codes).bytes == want[1].projection.bytes
    ctx.close()
