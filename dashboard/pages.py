"""The dashboard's pages: one function each (``render`` in a module of dashboard/ui/), by URL path.

The URL paths and titles are public: share links (``/layers?run=0&p=...``), the sidebar and the
tests reach pages by them. ``page`` builds the ``st.Page`` of one, for ``st.navigation`` and ``st.page_link``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import streamlit as st

from dashboard.ui import activations, compare, export, layers, model, overview, search


class PageSpec(NamedTuple):
    render: Callable[[], None]
    title: str
    icon: str


DEFAULT = "overview"  # served at the root URL too
PAGES: dict[str, PageSpec] = {  # URL path -> page, in the sidebar's order
    "overview": PageSpec(overview.render, "Overview", ":material/dashboard:"),
    "layers": PageSpec(layers.render, "Layers", ":material/tune:"),
    "model": PageSpec(model.render, "Model", ":material/account_tree:"),
    "search": PageSpec(lambda: search.render(page("layers")), "Search", ":material/manage_search:"),
    "activations": PageSpec(activations.render, "Activations", ":material/bar_chart:"),
    "export": PageSpec(export.render, "Export & share", ":material/share:"),
    "compare": PageSpec(compare.render, "Compare", ":material/compare_arrows:"),
}


def page(url_path: str) -> st.Page:
    """The page at ``url_path`` (call within a script run: ``st.Page`` needs one)."""
    try:
        spec = PAGES[url_path]
    except KeyError:
        raise KeyError(f"unknown page {url_path!r}; known: {', '.join(PAGES)}") from None
    return st.Page(spec.render, title=spec.title, icon=spec.icon, url_path=url_path, default=url_path == DEFAULT)


def navigation() -> st.Page:
    """Register every page with ``st.navigation``; returns the page this run shows (call ``.run()`` on it)."""
    return st.navigation([page(p) for p in PAGES])
