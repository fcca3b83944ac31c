"""QuantLens dashboard entry script: page config, the shared sidebar, navigation.

Run with ``quantlens dashboard RUN_DIR ...`` (see ``dashboard.serve``). The pages are functions
(``dashboard.pages``), so this is the only script Streamlit runs.
"""
from __future__ import annotations

import streamlit as st

from dashboard import pages, state
from dashboard.components import sidebar

st.set_page_config(page_title="QuantLens", page_icon="🔎", layout="wide")
state.init()
sidebar()
pages.navigation().run()
