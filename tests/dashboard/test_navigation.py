"""Pages are functions reached by their URL paths; every session-state key lives in dashboard/state.py."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from analysis.store.run import load_run
from apptest_support import open_bulk, switch_page
from dashboard import pages, state

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboard"
TITLES = {"overview": "Overview", "layers": "Layers", "model": "Model", "search": "Search", "activations": "Activations",
          "export": "Export & share", "compare": "Compare"}  # links, bookmarks and the e2e tests use these


def test_url_paths_and_titles_stay_as_links_know_them(app, syn_dir):
    assert {p: spec.title for p, spec in pages.PAGES.items()} == TITLES
    at = app([syn_dir])
    registered = {info["url_pathname"]: info["page_name"] for info in at._registered_pages.values()}
    assert registered == {("" if p == pages.DEFAULT else p): t for p, t in TITLES.items()}
    assert all(not info["script_path"] for info in at._registered_pages.values())  # functions, not scripts
    assert not (DASHBOARD / "views").exists()


@pytest.mark.parametrize("url_path, heading", [("layers", "Layers"), ("search", "Search"),
                                               ("activations", "Activations"), ("export", "Export & share")])
def test_each_url_path_opens_its_page(app, syn_dir, url_path, heading):
    at = app([syn_dir], url_path)
    assert not at.exception and at.title[0].value == heading
    switch_page(at, "overview").run()
    assert at.title[0].value.startswith("Overview")


def test_search_links_to_the_layers_page(app, syn_dir):
    at = app([syn_dir], "search")
    link = next(e.proto for e in at.get("page_link") if e.proto.label == "See and edit it layer by layer")
    assert link.page == "layers"
    assert link.page_script_hash in at._registered_pages


def test_bulk_set_by_layer_type_reads_the_type_not_the_label(app, syn_dir):
    run = load_run(syn_dir)
    at = open_bulk(app([syn_dir], "layers"))
    scope = at.selectbox(key=state.BULK_SCOPE)
    assert scope.options == ["all layers", "shown layers (filter)", "all Conv2d layers", "all Linear layers"]
    scope.set_value(("type", "Conv2d"))
    at.selectbox(key=state.BULK_FMT).set_value("int8")
    at.button(key=state.BULK_SET).click().run()
    assert not at.exception
    codes = at.session_state[state.codes_key(at.session_state[state.RUN_DIRS][0])]
    conv = run.layers.sort_values("order")["type"].to_numpy() == "Conv2d"
    assert np.array_equal(codes != 0, conv)


def _key_literals(path: Path) -> list[str]:
    """Where ``path`` spells a session-state or widget key as a string literal instead of using dashboard.state."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(DASHBOARD.parent)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("ql."):
            found.append(f"{where} {node.value!r}")
        elif isinstance(node, ast.keyword) and node.arg == "key" and isinstance(node.value, (ast.Constant,
                                                                                              ast.JoinedStr)):
            found.append(f"{where} key={ast.unparse(node.value)}")
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("session_state") \
                and isinstance(node.slice, (ast.Constant, ast.JoinedStr)):
            found.append(f"{where} {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and ast.unparse(node.func.value).endswith("session_state") and node.args \
                and isinstance(node.args[0], (ast.Constant, ast.JoinedStr)):
            found.append(f"{where} {ast.unparse(node)}")
    return found


def test_session_state_keys_are_defined_in_one_module():
    files = [p for p in DASHBOARD.rglob("*.py") if p.name != "state.py"]
    assert len(files) > 10
    assert [hit for p in files for hit in _key_literals(p)] == []


def test_the_key_scan_finds_a_stray_key(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "DASHBOARD", tmp_path)
    page = tmp_path / "page.py"
    page.write_text('import streamlit as st\nst.session_state["x"] = 1\nst.toggle("t", key=f"k_{1}")\n'
                    'st.session_state.get("y")\nA = "ql.z"\n')
    assert len(_key_literals(page)) == 4
