"""The dashboard pages, one module each with a ``render`` function; dashboard/pages.py registers them."""
