"""Self-contained HTML and Markdown reports of a Run.

May import: ``project``, ``store``, ``quant``."""
