"""Search page. A thin script: the page lives in dashboard/ui/search.py, compiled once on import."""
from dashboard.ui.search import render

render()
