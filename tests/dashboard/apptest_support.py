"""AppTest helpers for the dashboard tests (imported by name: pytest puts this folder on sys.path)."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "dashboard" / "app.py")
PAGES = {"overview": "views/overview.py", "layers": "views/layers.py", "search": "views/search.py",
         "activations": "views/activations.py",
         "export": "views/export.py"}


def make_app(run_dirs: list[str], page: str = "overview", query: dict | None = None) -> AppTest:
    """An AppTest on ``page`` with ``run_dirs`` open; already run once."""
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["ql.run_dirs"] = [str(Path(d).resolve()) for d in run_dirs]
    for k, v in (query or {}).items():
        at.query_params[k] = v
    at.run()
    if page != "overview":
        at.switch_page(PAGES[page]).run()
    return at
