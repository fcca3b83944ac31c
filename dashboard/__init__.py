"""QuantLens dashboard (Streamlit)."""
