"""Overview page. A thin script: the page lives in dashboard/ui/overview.py, compiled once on import."""
from dashboard.ui.overview import render

render()
