"""Export & share page. A thin script: the page lives in dashboard/ui/export.py, compiled once on import."""
from dashboard.ui.export import render

render()
