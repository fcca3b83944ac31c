"""Layers page. A thin script: the page lives in dashboard/ui/layers.py, compiled once on import."""
from dashboard.ui.layers import render

render()
