"""The dashboard pages, one module each; dashboard/views/ holds the scripts that call them."""
