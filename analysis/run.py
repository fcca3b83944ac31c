"""The Run store: a folder with ``run.json`` and one Parquet file per table.

Everything downstream of the engine (dashboard, search, report) reads a Run and never
the model. A Run is written into a staging folder beside its destination and renamed
into place, so a reader sees either no Run or a whole one.

Tables (schema ``quantlens.run/1``; columns are listed in ``TABLE_COLUMNS``):

* ``layers``      one row per quantizable layer, in execution order
* ``sensitivity`` one row per layer x format: the task metric and losses with only that layer quantized
* ``histograms``  one row per layer x tensor (weight / input / output): a fixed-bin histogram
* ``clipping``    one row per layer x tensor x format: calibrated clip range, clipped share, SQNR
* ``cost``        one row per layer x format (fp32 included): exact bytes, measured latency
* ``policies``    one row per whole-model policy that was measured (baseline, uniform, mixed)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = "quantlens.run/1"
SUPPORTED_SCHEMAS = (SCHEMA,)

TABLE_COLUMNS: dict[str, list[str]] = {
    "layers": ["name", "type", "order", "weight_shape", "params", "macs", "in_features",
               "out_features", "reaches_output"],
    "sensitivity": ["layer", "format", "status", "reason", "metric", "metric_delta", "loss",
                    "loss_delta", "kl", "output_sqnr_db", "weight_sqnr_db"],
    "histograms": ["layer", "tensor", "lo", "hi", "counts", "count", "mean", "std", "absmax"],
    "clipping": ["layer", "tensor", "format", "clip_lo", "clip_hi", "clipped_fraction", "sqnr_db"],
    "cost": ["layer", "format", "bytes", "latency_ms", "latency_spread_ms", "latency_source"],
    "policies": ["name", "kind", "layers_json", "metric", "loss", "bytes", "latency_ms",
                 "measured_on", "projected_metric", "projected_band"],
}
TABLES = tuple(TABLE_COLUMNS)


class RunError(ValueError):
    """A folder that is not a readable Run; the message names the file and field."""


@dataclass
class Run:
    path: Path
    meta: dict
    tables: dict[str, pd.DataFrame] = field(repr=False)

    def __getattr__(self, name: str) -> pd.DataFrame:
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(name)

    @property
    def formats(self) -> list[str]:
        return list(self.meta["formats"])

    @property
    def status(self) -> str:
        return self.meta.get("status", "complete")

    @property
    def model_sha256(self) -> str:
        return self.meta["model"]["sha256"]

    @property
    def higher_is_better(self) -> bool:
        return bool(self.meta["metric"]["higher_is_better"])

    @property
    def layer_names(self) -> list[str]:
        return self.layers.sort_values("order")["name"].tolist()

    def bytes_table(self) -> pd.DataFrame:
        """Bytes per layer (rows, execution order) and format (columns)."""
        t = self.cost.pivot(index="layer", columns="format", values="bytes")
        return t.reindex(self.layer_names)


def _write_table(df: pd.DataFrame, path: Path) -> None:
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    pq.write_table(table, path, compression="zstd")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_run(path: str | os.PathLike, meta: dict, tables: dict[str, pd.DataFrame], *, overwrite: bool = False) -> Run:
    """Write a whole Run at ``path`` atomically (staged beside it, then renamed).

    Raises:
        RunError: a table is missing or lacks a column, or ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    for name, cols in TABLE_COLUMNS.items():
        if name not in tables:
            raise RunError(f"table '{name}' is missing")
        missing = [c for c in cols if c not in tables[name].columns]
        if missing:
            raise RunError(f"table '{name}' lacks column(s) {', '.join(missing)}")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise RunError(f"{path}: exists and is not empty")
    meta = {**meta, "schema": SCHEMA}
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.staging-"))
    try:
        for name in TABLES:
            _write_table(tables[name], stage / f"{name}.parquet")
        (stage / "run.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(stage, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return Run(path, meta, {k: tables[k].reset_index(drop=True) for k in TABLES})


def update_meta(run: Run, **changes) -> None:
    """Merge ``changes`` into run.json (atomic replace)."""
    run.meta.update(changes)
    _atomic_write_text(run.path / "run.json", json.dumps(run.meta, indent=2, sort_keys=True, default=str) + "\n")


def replace_table(run: Run, name: str, df: pd.DataFrame) -> None:
    """Replace one table of an existing Run atomically (e.g. after a verify)."""
    if name not in TABLE_COLUMNS:
        raise RunError(f"unknown table '{name}'; known: {', '.join(TABLES)}")
    fd, tmp = tempfile.mkstemp(dir=run.path, prefix=f".{name}.", suffix=".parquet.tmp")
    os.close(fd)
    try:
        _write_table(df, Path(tmp))
        os.replace(tmp, run.path / f"{name}.parquet")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    run.tables[name] = df.reset_index(drop=True)


def load_run(path: str | os.PathLike) -> Run:
    """Read a Run folder back.

    Raises:
        RunError: not a folder, no or unreadable ``run.json``, an unknown schema version,
            a missing or corrupt table, or a table missing a column. The message names the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: not a folder")
    meta_path = path / "run.json"
    if not meta_path.is_file():
        raise RunError(f"{path}: not a Run (no run.json)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise RunError(f"{meta_path}: expected a JSON object")
    schema = meta.get("schema")
    if schema not in SUPPORTED_SCHEMAS:
        raise RunError(f"{meta_path}: field 'schema' is {schema!r}; this version reads {', '.join(SUPPORTED_SCHEMAS)}")
    for key in ("model", "metric", "formats", "baseline"):
        if key not in meta:
            raise RunError(f"{meta_path}: field '{key}' is missing")
    tables = {}
    for name, cols in TABLE_COLUMNS.items():
        file = path / f"{name}.parquet"
        if not file.is_file():
            raise RunError(f"{file}: missing")
        try:
            df = pq.read_table(file).to_pandas()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise RunError(f"{file}: unreadable Parquet ({type(e).__name__}: {e})") from None
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise RunError(f"{file}: column(s) {', '.join(missing)} missing")
        tables[name] = df
    return Run(path, meta, tables)
