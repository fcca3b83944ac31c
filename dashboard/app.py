"""QuantLens dashboard entry script: page config, the shared sidebar, navigation.

Run with ``quantlens dashboard RUN_DIR ...`` (see ``dashboard.serve``).
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard import state
from dashboard.components import sidebar

HERE = Path(__file__).parent

st.set_page_config(page_title="QuantLens", page_icon=":material/troubleshoot:", layout="wide")
state.init()
sidebar()
st.navigation([
    st.Page(HERE / "views" / "overview.py", title="Overview", icon=":material/dashboard:", default=True),
    st.Page(HERE / "views" / "layers.py", title="Layers", icon=":material/tune:", url_path="layers"),
    st.Page(HERE / "views" / "search.py", title="Search", icon=":material/manage_search:", url_path="search"),
    st.Page(HERE / "views" / "activations.py", title="Activations", icon=":material/bar_chart:", url_path="activations"),
    st.Page(HERE / "views" / "export.py", title="Export & share", icon=":material/share:", url_path="export"),
    st.Page(HERE / "views" / "compare.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
]).run()
