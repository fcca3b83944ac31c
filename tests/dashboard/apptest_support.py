"""AppTest helpers for the dashboard tests (imported by name: pytest puts this folder on sys.path)."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from dashboard import state
from dashboard.pages import DEFAULT

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
PAGES = ("overview", "layers", "search", "activations", "export")  # URL paths; Compare has its own tests


def switch_page(at: AppTest, url_path: str) -> AppTest:
    """``AppTest.switch_page`` for a page that is a function: found by its URL path, not by a file.

    ``AppTest.switch_page`` (Streamlit 1.67) takes file pages only; a browser asks for a page by the hash of
    its URL path, which is what this sets. Run the app once first, so that its pages are registered.
    """
    want = "" if url_path == DEFAULT else url_path  # the default page is registered at the root
    found = [h for h, info in at._registered_pages.items() if info.get("url_pathname") == want]
    if len(found) != 1:
        known = [info.get("url_pathname") for info in at._registered_pages.values()]
        raise ValueError(f"no page at URL path {url_path!r} (run the app first); known: {known}")
    at._page_hash = found[0]
    return at


def make_app(run_dirs: list[str], page: str = "overview", query: dict | None = None) -> AppTest:
    """An AppTest on ``page`` (a URL path) with ``run_dirs`` open; already run once."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state[state.RUN_DIRS] = [str(Path(d).resolve()) for d in run_dirs]
    for k, v in (query or {}).items():
        at.query_params[k] = v
    at.run()
    if page != "overview":
        switch_page(at, page).run()
    return at
