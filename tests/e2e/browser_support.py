"""Helpers for the browser tests (imported by name: pytest puts this folder on sys.path)."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "screenshots"
TIMEOUT = 30_000  # ms
LOCAL_SCHEMES = {"data", "blob", "file", "about"}
FOREIGN: list[str] = []  # requests for another host than 127.0.0.1 in the test that runs now (see conftest.py)


def is_local(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in LOCAL_SCHEMES or parts.hostname == "127.0.0.1"


def save_screenshot(locator, name: str) -> Path:
    """docs/screenshots/<name>.png, where the README shows it: every run of the journeys redraws the README's
    pictures, so they show what the app draws now (tests/e2e/test_screenshots.py checks the two lists agree)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    locator.screenshot(path=str(path))
    return path


def set_format(page, row: int, fmt: str) -> None:
    """Pick ``fmt`` in the Layers table's format cell of ``row`` (the grid is a canvas: cells by coordinates).

    A double-click opens the cell's editor; on a cell edited before, its menu opens closed, so ArrowDown opens it.
    """
    from dashboard.ui.layers import FORMAT_PX, LAYER_PX, ROW_PX  # where the format cells sit in the grid

    box = page.get_by_test_id("stDataFrame").bounding_box()
    page.mouse.dblclick(box["x"] + LAYER_PX + FORMAT_PX / 2, box["y"] + ROW_PX * (row + 1) + ROW_PX / 2)
    combo = page.locator('[id^="gdg-overlay"] [role="combobox"]')
    combo.wait_for(timeout=TIMEOUT)
    if combo.get_attribute("aria-expanded") != "true":
        combo.press("ArrowDown")
    page.get_by_role("option", name=fmt, exact=True).click(timeout=TIMEOUT)
