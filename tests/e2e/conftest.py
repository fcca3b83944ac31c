"""A real dashboard server on a free port and Debian's Chromium driven by Playwright."""
from __future__ import annotations

import shutil

import pytest

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


@pytest.fixture(scope="session")
def browser():
    """Chromium with the flags that work on these machines; Playwright gives it a fresh temporary profile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def dashboard(digits_run):
    """URL of a real `streamlit run` server on the demo Run."""
    proc, url = start_server([str(digits_run.path)])
    yield url
    stop_server(proc)
