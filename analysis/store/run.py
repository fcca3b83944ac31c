"""The Run store: a folder with ``run.json`` and one Parquet file per table.

Everything downstream of the engine (dashboard, search, report) reads a Run and never
the model. A Run is written into a staging folder beside its destination and renamed
into place, so a reader sees either no Run or a whole one.

Tables (schema ``quantlens.run/1``; columns are listed in ``TABLE_COLUMNS``):

* ``layers``      one row per quantizable layer, in execution order; optional column ``fed_by`` (JSON list of
                  the layers feeding it, ``Run.fed_by``) where the model's graph was read (``meta["structure"]``)
* ``sensitivity`` one row per layer x format: the task metric and losses with only that layer quantized
* ``histograms``  one row per layer x tensor (weight / input / output): a fixed-bin histogram
* ``clipping``    one row per layer x tensor x format: calibrated clip range, clipped share, SQNR;
                  activation rows (input, and output for static kernels) also hold the quantizer's
                  ``scale`` and ``zero_point`` that apply and verify hand to onnxruntime (optional
                  columns: older Runs lack them and still open)
* ``cost``        one row per layer x format (fp32 included): exact bytes, measured latency
* ``policies``    one row per whole-model policy that was measured (baseline, uniform, mixed)
* ``channels``    optional, one row per layer x output channel: weight min/max, each format's step and
                  SQNR (``analysis.store.channels``; Runs written before it lack the file and still open)
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.store.atomic import atomic_path, folder_lock, write_text_atomic
from analysis.errors import InputError

SCHEMA = "quantlens.run/1"
LEFTOVER = re.compile(r"(?:staging-(\d+)-\w+|old-(\d+))")  # after ".NAME.": what write_run leaves when killed
SUPPORTED_SCHEMAS = (SCHEMA,)
MAX_META_BYTES = 16 << 20  # run.json of a 10,000-layer Run is well under 1 MiB

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
# written when given, not read by load_run (analysis.store.channels reads it); name -> rows per Parquet row
# group, small so that a reader filtering one layer (rows sorted by layer) decodes only that layer's groups
OPTIONAL_TABLES = {"channels": 16_384}


class RunError(InputError):
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

    def fed_by(self) -> dict[str, list[str]] | None:
        """Per layer, the layers that feed it (``layers`` column ``fed_by``), or None when the Run does not
        record dataflow (older Runs, models whose graph was not read: ``meta["structure"]`` says why)."""
        return parse_fed_by(self.layers, self.path / "layers.parquet")

    def bytes_table(self) -> pd.DataFrame:
        """Bytes per layer (rows, execution order) and format (columns)."""
        t = self.cost.pivot(index="layer", columns="format", values="bytes")
        return t.reindex(self.layer_names)


def _write_table(df: pd.DataFrame, path: Path, row_group_size: int | None = None) -> None:
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    with open(path, "wb") as f:  # a file object: pyarrow cannot encode non-UTF-8 path names itself
        pq.write_table(table, f, compression="zstd", row_group_size=row_group_size)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_leftovers(path: str | os.PathLike) -> list[str]:
    """Remove what writers killed mid-write left of the Run at ``path``: beside it, the staging
    folder of a first write and the previous Run of an ``--overwrite`` (``.NAME.staging-PID-*``,
    ``.NAME.old-PID``, only when process PID is gone); inside it, temporary table files
    (``.*.tmp``, under the Run's lock). Returns the names removed."""
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for p in path.parent.glob(f".{glob.escape(path.name)}.*"):
            m = LEFTOVER.fullmatch(p.name[len(path.name) + 2:])
            if m and p.is_dir() and not _pid_alive(int(m.group(1) or m.group(2))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    if path.is_dir():
        with folder_lock(path):
            for p in path.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                removed.append(p.name)
    return removed


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
    clean_leftovers(path)
    stage = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.staging-{os.getpid()}-"))
    try:
        for name in (*TABLES, *(t for t in OPTIONAL_TABLES if t in tables)):
            _write_table(tables[name], stage / f"{name}.parquet", OPTIONAL_TABLES.get(name))
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
    write_text_atomic(run.path / "run.json", json.dumps(run.meta, indent=2, sort_keys=True, default=str) + "\n")


def replace_table(run: Run, name: str, df: pd.DataFrame) -> None:
    """Replace one table of an existing Run atomically (e.g. after a verify)."""
    if name not in TABLE_COLUMNS:
        raise RunError(f"unknown table '{name}'; known: {', '.join(TABLES)}")
    with atomic_path(run.path / f"{name}.parquet") as tmp:
        _write_table(df, tmp)
    run.tables[name] = df.reset_index(drop=True)


def write_optional_table(run: Run, name: str, df: pd.DataFrame) -> None:
    """Write one of ``OPTIONAL_TABLES`` into an existing Run atomically (it is not kept in ``run.tables``)."""
    if name not in OPTIONAL_TABLES:
        raise RunError(f"unknown optional table '{name}'; known: {', '.join(OPTIONAL_TABLES)}")
    with atomic_path(run.path / f"{name}.parquet") as tmp:
        _write_table(df, tmp, OPTIONAL_TABLES[name])


def _read_parquet(file: Path) -> pd.DataFrame:
    with open(file, "rb") as f:  # a file object: pyarrow cannot decode non-UTF-8 path names itself
        return pq.read_table(f).to_pandas()


def read_table(run: Run, name: str) -> pd.DataFrame:
    """One table as it is on disk now (another process may have rewritten it since ``run`` was read)."""
    return _read_parquet(run.path / f"{name}.parquet")


SWEEP_POLICY_KINDS = ("baseline", "uniform", "random")  # policies rows a sweep writes; verified rows are not
POLICY_KIND_ORDER = {k: i for i, k in enumerate(SWEEP_POLICY_KINDS)}


def merge_policy_rows(run: Run, rows, *, owned_kinds: tuple[str, ...] = ()) -> pd.DataFrame:
    """Under the Run's lock, rewrite ``policies`` as the rows on disk minus those named in ``rows``
    (and minus every row whose kind is in ``owned_kinds``), plus ``rows``: a sweep refreshing its
    rows and verifies adding theirs can run at the same time without losing one. ``rows`` may be a
    function of the table on disk (to pick a free name under the same lock). Rows stay ordered
    baseline, uniform, random, then the rest in the order they came."""
    with folder_lock(run.path):
        disk = read_table(run, "policies")
        if callable(rows):
            rows = rows(disk)
        keep = disk[~disk["name"].isin(rows["name"]) & ~disk["kind"].isin(owned_kinds)]
        table = pd.concat([keep, rows], ignore_index=True) if len(keep) else rows.reset_index(drop=True)
        rank = table["kind"].map(POLICY_KIND_ORDER).fillna(len(POLICY_KIND_ORDER)).to_numpy()
        replace_table(run, "policies", table.iloc[np.argsort(rank, kind="stable")].reset_index(drop=True))
    return run.tables["policies"]


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
    if meta_path.stat().st_size > MAX_META_BYTES:
        raise RunError(f"{meta_path}: {meta_path.stat().st_size:,} bytes, more than a run.json holds "
                       f"(limit {MAX_META_BYTES:,})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{meta_path}: not valid JSON ({e})") from None
    except RecursionError:
        raise RunError(f"{meta_path}: not valid JSON (nested too deeply)") from None
    _check_meta(meta, meta_path)
    tables = {}
    for name, cols in TABLE_COLUMNS.items():
        file = path / f"{name}.parquet"
        if not file.is_file():
            raise RunError(f"{file}: missing")
        try:
            df = _read_parquet(file)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise RunError(f"{file}: unreadable Parquet ({type(e).__name__}: {e})") from None
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise RunError(f"{file}: column(s) {', '.join(missing)} missing")
        tables[name] = df
    _check_tables(tables, meta, path)
    return Run(path, meta, tables)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_meta(meta, meta_path: Path) -> None:
    """The fields every reader relies on, with their types; the message names the field."""
    if not isinstance(meta, dict):
        raise RunError(f"{meta_path}: expected a JSON object")
    schema = meta.get("schema")
    if schema not in SUPPORTED_SCHEMAS:
        raise RunError(f"{meta_path}: field 'schema' is {schema!r}; this version reads {', '.join(SUPPORTED_SCHEMAS)}")
    for key in ("model", "metric", "formats", "baseline"):
        if key not in meta:
            raise RunError(f"{meta_path}: field '{key}' is missing")
    checks = [
        ("model", isinstance(meta["model"], dict), "an object"),
        ("model.sha256", isinstance(meta["model"], dict) and isinstance(meta["model"].get("sha256"), str), "a string"),
        ("metric", isinstance(meta["metric"], dict), "an object"),
        ("metric.name", isinstance(meta["metric"], dict) and isinstance(meta["metric"].get("name"), str), "a string"),
        ("metric.higher_is_better", isinstance(meta["metric"], dict)
         and isinstance(meta["metric"].get("higher_is_better"), bool), "true or false"),
        ("formats", isinstance(meta["formats"], list) and all(isinstance(f, str) for f in meta["formats"])
         and len(set(meta["formats"])) == len(meta["formats"]), "a list of distinct format names"),
        ("baseline", isinstance(meta["baseline"], dict), "an object"),
        ("baseline.metric", isinstance(meta["baseline"], dict) and _is_number(meta["baseline"].get("metric")), "a number"),
        ("baseline.loss", isinstance(meta["baseline"], dict) and _is_number(meta["baseline"].get("loss")), "a number"),
        ("status", meta.get("status", "complete") in ("partial", "complete"), "'partial' or 'complete'"),
    ]
    for field_name, ok, expected in checks:
        if not ok:
            raise RunError(f"{meta_path}: field '{field_name}' must be {expected}")


NUMERIC_COLUMNS = {"layers": ("order",), "cost": ("bytes",), "sensitivity": ("metric", "loss", "loss_delta", "kl")}


def parse_fed_by(layers: pd.DataFrame, file: Path) -> dict[str, list[str]] | None:
    """The optional ``fed_by`` column (a JSON list of layer names per row) as a dict, checked; None when absent
    or empty in every row."""
    if "fed_by" not in layers.columns or layers["fed_by"].isna().all():
        return None
    known, out = set(layers["name"]), {}
    for name, cell in zip(layers["name"], layers["fed_by"]):
        try:
            value = json.loads(cell) if isinstance(cell, str) else None
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) and v in known for v in value):
            raise RunError(f"{file}: column 'fed_by' of layer {name!r} must be a JSON list of layer names, "
                           f"got {cell!r:.80}")
        out[name] = value
    return out


def _check_tables(tables: dict[str, pd.DataFrame], meta: dict, path: Path) -> None:
    """Tables that disagree with each other or with run.json are refused, naming the table and field:
    downstream numbers (projections, sizes, the URL codec) would silently be wrong otherwise."""
    for name, cols in NUMERIC_COLUMNS.items():
        for c in cols:
            if not (pd.api.types.is_numeric_dtype(tables[name][c]) and not pd.api.types.is_bool_dtype(tables[name][c])):
                raise RunError(f"{path / f'{name}.parquet'}: column '{c}' must be numeric")
    layers = tables["layers"]
    names = layers["name"]
    if not all(isinstance(n, str) for n in names):
        raise RunError(f"{path / 'layers.parquet'}: column 'name' must hold strings")
    if names.duplicated().any():
        raise RunError(f"{path / 'layers.parquet'}: layer {names[names.duplicated()].iloc[0]!r} appears twice")
    parse_fed_by(layers, path / "layers.parquet")
    known, formats = set(names), list(meta["formats"])
    allowed = {"sensitivity": set(formats), "clipping": set(formats), "cost": {"fp32", *formats}}
    for name in ("sensitivity", "histograms", "clipping", "cost"):
        t = tables[name]
        unknown = sorted({str(x) for x in t["layer"] if x not in known})
        if unknown:
            raise RunError(f"{path / f'{name}.parquet'}: column 'layer' names layer(s) not in layers.parquet: "
                           + ", ".join(unknown[:5]))
        if name in allowed:
            bad = sorted({str(x) for x in t["format"] if x not in allowed[name]})
            if bad:
                raise RunError(f"{path / f'{name}.parquet'}: column 'format' holds {', '.join(bad[:5])}, "
                               f"not in run.json field 'formats' ({', '.join(formats)})")
    for name in ("sensitivity", "cost"):
        keys = tables[name][["layer", "format"]]
        if keys.duplicated().any():
            layer, fmt = keys[keys.duplicated()].iloc[0]
            raise RunError(f"{path / f'{name}.parquet'}: two rows for layer {layer!r} at format {fmt!r}")
    sens = tables["sensitivity"]
    have = set(zip(sens["layer"], sens["format"]))
    for n in names:
        for f in formats:
            if (n, f) not in have:
                raise RunError(f"{path / 'sensitivity.parquet'}: no row for layer {n!r} at format {f!r} "
                               f"(run.json field 'formats' lists it)")
