"""Files others rely on: the Run folder (run.json + Parquet), the Policy file, bundles, atomic writes and locks.

May import: ``quant``."""
