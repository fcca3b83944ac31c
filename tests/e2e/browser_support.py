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


def table_point(page, row: int, column: str = "format", n_rows: int = 0) -> tuple[float, float]:
    """Where ``column`` ("box": the row's selection box, "layer" or "format") of ``row`` (its position in the
    Layers table) is on the page: the grid is a canvas, its pinned columns have fixed widths."""
    from dashboard.ui.layers import FORMAT_PX, LAYER_PX, ROW_PX, marker_px

    box = page.get_by_test_id("stDataFrame").first.bounding_box()
    m = marker_px(n_rows)
    x = {"box": m / 2, "layer": m + LAYER_PX / 2, "format": m + LAYER_PX + FORMAT_PX / 2}[column]
    return box["x"] + x, box["y"] + ROW_PX * (row + 1) + ROW_PX / 2


def cell_text(page, col: int, row: int) -> str:
    """A Layers table cell as the grid's accessible table has it (column 0 holds the row boxes, 1 the layer)."""
    return page.get_by_test_id(f"glide-cell-{col}-{row}").first.text_content(timeout=TIMEOUT)


def click_format(page, row: int, n_rows: int = 0) -> str:
    """Click the format cell of ``row`` once and wait until the table shows its next format; returns it."""
    before = cell_text(page, 2, row)
    page.mouse.click(*table_point(page, row, "format", n_rows))
    page.wait_for_function(
        "([id, before]) => { const c = document.querySelector(`[data-testid=\"${id}\"]`);"
        " return c && c.textContent !== before; }", arg=[f"glide-cell-2-{row}", before], timeout=TIMEOUT)
    return cell_text(page, 2, row)


def set_format(page, row: int, fmt: str, n_rows: int = 0) -> None:
    """Click the format cell of ``row`` until it shows ``fmt`` (each click moves one format along its cycle)."""
    for _ in range(5):
        if cell_text(page, 2, row) == fmt:
            return
        click_format(page, row, n_rows)
    raise AssertionError(f"row {row} never showed {fmt}")


def wait_formats(page, want: dict[int, str]) -> None:
    """Wait until the Layers table shows ``want`` (row position -> format); the headline is drawn before the table."""
    page.wait_for_function(
        "(want) => Object.entries(want).every(([r, f]) => {"
        " const c = document.querySelector(`[data-testid=\"glide-cell-2-${r}\"]`); return c && c.textContent === f; })",
        arg={str(r): f for r, f in want.items()}, timeout=TIMEOUT)
