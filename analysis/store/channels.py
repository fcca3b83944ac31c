"""The Run's optional ``channels`` table: per-output-channel weight statistics (``channels.parquet``).

Columns: ``layer``, ``channel`` (first output channel of the row), ``n_channels`` (1, or how many
consecutive channels a row of a very wide layer summarises), ``min``, ``max``, ``absmax``, ``mean``, ``std``,
and per quantized format F: ``step[F]`` (the quantization step the engine's format gives the channel) and
``sqnr_db[F]`` (that channel's weight SQNR). ``analysis.engine.channels`` writes it with the Run.

It is not read with the Run (``load_run``): it can hold millions of rows, and pages need one layer at a time.
Runs written before it existed have no such file: ``read_channels`` returns None for them.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from analysis.store.run import RunError

CHANNELS = "channels"
CHANNEL_FILE = f"{CHANNELS}.parquet"
CHANNEL_COLUMNS = ["layer", "channel", "n_channels", "min", "max", "absmax", "mean", "std"]
_FORMAT_COLUMN = re.compile(r"^(step|sqnr_db)\[(.+)\]$")
OUTLIER_RATIO = 3.0  # a channel whose |max| passes this many times the median channel's is an outlier


def step_column(fmt: str) -> str:
    return f"step[{fmt}]"


def sqnr_column(fmt: str) -> str:
    return f"sqnr_db[{fmt}]"


def channel_formats(df: pd.DataFrame) -> list[str]:
    """The formats whose per-channel step the table holds, in column order."""
    return [m.group(2) for c in df.columns if (m := _FORMAT_COLUMN.match(str(c))) and m.group(1) == "step"]


def has_channels(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / CHANNEL_FILE).is_file()


def read_channels(run_dir: str | os.PathLike, layer: str | None = None) -> pd.DataFrame | None:
    """The ``channels`` rows of ``layer`` (all layers when None) in channel order, or None for a Run
    that predates the table.

    Raises:
        RunError: the file is unreadable or lacks a column; the message names the file and column.
    """
    file = Path(run_dir) / CHANNEL_FILE
    if not file.is_file():
        return None
    try:
        with open(file, "rb") as f:  # a file object: pyarrow cannot decode non-UTF-8 path names itself
            names = pq.read_schema(f).names
            missing = [c for c in CHANNEL_COLUMNS if c not in names]
            if missing:
                raise RunError(f"{file}: column(s) {', '.join(missing)} missing")
            f.seek(0)
            table = pq.read_table(f, filters=None if layer is None else [("layer", "==", layer)])
    except RunError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise RunError(f"{file}: unreadable Parquet ({type(e).__name__}: {e})") from None
    df = table.to_pandas()
    return df.sort_values(["layer", "channel"] if layer is None else "channel", kind="stable").reset_index(drop=True)
