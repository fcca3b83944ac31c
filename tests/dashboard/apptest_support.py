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


def layer_table(at: AppTest):
    """The Layers page's table (an ``st.dataframe`` keyed by ``state.table_key``)."""
    return next(df for df in at.dataframe if (df.key or "").startswith("ql.table::"))


def click_format(at: AppTest, row: int) -> AppTest:
    """What a click on the format cell of ``row`` (its position in the table) sends: the button column's trigger.

    AppTest cannot click inside a grid; this sends the value the browser sends (``{"row", "label"}``) for the
    widget the table registered for its format column, with every other widget's state as it is.
    """
    import json

    table = layer_table(at)
    ws = at._tree.get_widget_states()
    w = ws.widgets.add()
    w.id = table.proto.button_click_widgets["format"]
    w.string_trigger_value.data = json.dumps({"row": row, "label": str(table.value["format"].iloc[row])})
    return at._run(ws)


def set_format(at: AppTest, row: int, fmt: str) -> AppTest:
    """Click the format cell of ``row`` until it shows ``fmt`` (each click moves one format along the cycle)."""
    for _ in range(5):
        if layer_table(at).value["format"].iloc[row] == fmt:
            return at
        click_format(at, row)
        assert not at.exception, at.exception
    raise AssertionError(f"row {row} never showed {fmt}: {layer_table(at).value['format'].iloc[row]}")


def select_rows(at: AppTest, path: str, rows: list[int]) -> AppTest:
    """Select table rows (their positions) as the boxes in the browser do; not run."""
    at.session_state[state.table_key(path)] = {"selection": {"rows": list(rows)}}
    return at


def open_bulk(at: AppTest) -> AppTest:
    """Open the Layers page's bulk actions box (drawn only while open) and run."""
    at.session_state[state.BULK_OPEN] = True
    return at.run()


def cycle(at: AppTest, row: int) -> list[str]:
    """The formats the format cell of ``row`` shows over clicks until it is back where it started."""
    start = layer_table(at).value["format"].iloc[row]
    seen = [start]
    for _ in range(6):
        click_format(at, row)
        assert not at.exception, at.exception
        seen.append(layer_table(at).value["format"].iloc[row])
        if seen[-1] == start:
            return seen
    raise AssertionError(f"row {row} did not come back to {start}: {seen}")
