"""A real dashboard server on a free port and Debian's Chromium driven by Playwright, kept offline.

Every browser context the tests open routes each request: one to any host but 127.0.0.1 (the README
promises that nothing is downloaded at run time) is aborted and recorded, and fails the test that made it.
"""
from __future__ import annotations

import shutil

import pytest

from browser_support import FOREIGN, is_local
from dashboard.serve import start_server, stop_server

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"]


def pytest_collection_modifyitems(items):
    if CHROMIUM is None:
        skip = pytest.mark.skip(reason="Debian's chromium is not installed (apt-get install chromium); "
                                       ".ci/run installs it")
        for item in items:
            if "e2e" in item.keywords:
                item.add_marker(skip)


def _route(route) -> None:
    if is_local(route.request.url):
        route.continue_()
    else:
        FOREIGN.append(route.request.url)
        route.abort()


def _watch_sockets(page) -> None:
    page.on("websocket", lambda ws: None if is_local(ws.url) else FOREIGN.append(ws.url))


class OfflineBrowser:
    """The Playwright browser, whose new contexts let no request leave 127.0.0.1."""

    def __init__(self, browser):
        self._browser = browser

    def new_context(self, **kwargs):
        ctx = self._browser.new_context(**kwargs)
        ctx.route("**/*", _route)
        ctx.on("page", _watch_sockets)
        return ctx

    def new_page(self, **kwargs):
        return self.new_context(**kwargs).new_page()

    def __getattr__(self, name):
        return getattr(self._browser, name)


@pytest.fixture(scope="session")
def browser():
    """Chromium with the flags that work on these machines; Playwright gives it a fresh temporary profile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield OfflineBrowser(b)
        b.close()


@pytest.fixture(autouse=True)
def offline():
    """Fails a test whose pages asked for anything off this machine."""
    FOREIGN.clear()
    yield
    assert not FOREIGN, f"requests left 127.0.0.1: {sorted(set(FOREIGN))}"


@pytest.fixture(scope="session")
def dashboard(digits_run):
    """URL of a real `streamlit run` server on the demo Run."""
    proc, url = start_server([str(digits_run.path)])
    yield url
    stop_server(proc)
