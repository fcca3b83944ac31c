"""Activations page. A thin script: the page lives in dashboard/ui/activations.py, compiled once on import."""
from dashboard.ui.activations import render

render()
