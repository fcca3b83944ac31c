"""Every Streamlit cache in one place: a Run is read once, its derived tables built once.

``st.cache_resource`` (not ``cache_data``) holds the loaded Run and its derived frames:
they are treated as read-only, and ``cache_data`` would hand each rerun a fresh copy,
a cost proportional to the Run on every toggle.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from analysis.api import FORMAT_CODE, POLICY_FORMATS
from analysis.api import Projector
from analysis.api import TABLES, Run, RunError, load_run, read_channels

MB = 1e6


@dataclass
class Loaded:
    """A Run with everything the pages derive from it, built once per Run version."""

    path: str
    run: Run
    projector: Projector
    layers: pd.DataFrame  # one row per layer, execution order, display columns (no format column)
    types: list[str]
    has_latency: bool
    hist: dict[tuple[str, str], dict] = field(repr=False)
    clip: dict[tuple[str, str], pd.DataFrame] = field(repr=False)

    @property
    def name(self) -> str:
        return str(self.run.meta["model"].get("name", Path(self.path).name))

    @property
    def synthetic(self) -> bool:
        return bool(self.run.meta.get("synthetic")) or self.name.startswith("synthetic:")


def _stamp(path: str) -> tuple[float, ...]:
    """Modification times of the Run's files, so a rewritten Run is read again."""
    p = Path(path)
    out = []
    for f in ["run.json", *(f"{t}.parquet" for t in TABLES)]:
        try:
            out.append(os.stat(p / f).st_mtime_ns)
        except OSError:
            out.append(-1)
    return tuple(out)


def _shown_as_zero(x: np.ndarray, decimals: int = 4) -> np.ndarray:
    """``x`` with the values the table shows as zero (at ``decimals``) set to +0: -3e-5 reads 0.0000, not -0.0000."""
    return np.where(np.round(x, decimals) == 0, 0.0, x)


def _layer_frame(run: Run, pj: Projector) -> pd.DataFrame:
    names = pj.names
    lay = run.layers.set_index("name").reindex(names)
    df = pd.DataFrame({"layer": names, "type": lay["type"].astype(str).to_numpy(),
                       "params": lay["params"].to_numpy(), "MACs": lay["macs"].to_numpy()})
    sens = run.sensitivity
    for fmt in run.formats:
        s = sens[sens["format"] == fmt].set_index("layer").reindex(names)
        df[f"Δmetric {fmt}"] = _shown_as_zero(s["metric_delta"].to_numpy(dtype=float))
        df[f"Δloss {fmt}"] = _shown_as_zero(s["loss_delta"].to_numpy(dtype=float))
        code = FORMAT_CODE.get(fmt)
        if code is not None:  # what the projection adds up: KL to FP32 (or the loss increase), never negative
            df[f"sensitivity {fmt}"] = np.where(pj.allowed[:, code], pj.penalty[:, code], np.nan)
        df[f"SQNR {fmt} (dB)"] = s["output_sqnr_db"].to_numpy(dtype=float)
    for fmt in POLICY_FORMATS:
        if fmt == "fp32" or fmt in run.formats:
            b = pj.bytes[:, FORMAT_CODE[fmt]].astype(float)
            df[f"KB {fmt}"] = np.where(pj.allowed[:, FORMAT_CODE[fmt]], b / 1e3, np.nan)
    if np.isfinite(pj.latency).any():
        for fmt in POLICY_FORMATS:
            if fmt == "fp32" or fmt in run.formats:
                df[f"ms {fmt}"] = pj.latency[:, FORMAT_CODE[fmt]]
    notes = []
    reaches = lay["reaches_output"].fillna(True).astype(bool).to_numpy()
    pending: dict[str, list[str]] = {}
    for layer, fmt in sens.loc[sens["status"] == "pending", ["layer", "format"]].itertuples(index=False):
        pending.setdefault(layer, []).append(fmt)
    for i in range(len(names)):
        parts = [] if reaches[i] else ["does not reach the output: sensitivity is 0 by construction, not a sign of safety"]
        waiting = pending.get(names[i], [])
        if waiting:  # an empty Δ cell of an unfinished sweep must not read as "harmless"
            which = "" if len(waiting) == len(run.formats) else " at " + ", ".join(f.upper() for f in waiting)
            parts.append(f"NOT MEASURED YET{which}: the sweep has not reached it; kept FP32 until it does")
        parts += [f"no {f}: {pj.reasons[(i, FORMAT_CODE[f])]}" for f in pj.formats
                  if (i, FORMAT_CODE[f]) in pj.reasons and f not in waiting]
        notes.append("; ".join(parts))
    df["note"] = notes
    return df


@st.cache_resource(show_spinner="Reading the Run…", max_entries=16)
def _load(path: str, stamp: tuple[float, ...]) -> Loaded:
    run = load_run(path)
    pj = Projector(run)
    layers = _layer_frame(run, pj)
    hist = {(str(r.layer), str(r.tensor)): {"lo": float(r.lo), "hi": float(r.hi), "counts": np.asarray(r.counts),
                                             "count": int(r.count), "mean": float(r.mean), "std": float(r.std),
                                             "absmax": float(r.absmax)}
            for r in run.histograms.itertuples(index=False)}
    clip = {k: g for k, g in run.clipping.groupby(["layer", "tensor"], sort=False)}
    return Loaded(path, run, pj, layers, sorted(layers["type"].unique().tolist()),
                  bool(np.isfinite(pj.latency).any()), hist, clip)


def open_run(path: str) -> Loaded | str:
    """The loaded Run at ``path``, or a one-paragraph message saying why it cannot be read."""
    try:
        return _load(str(Path(path).resolve()), _stamp(path))
    except RunError as e:
        return str(e)
    except (KeyError, ValueError, TypeError, AttributeError, json.JSONDecodeError) as e:
        what = f"field {e}" if isinstance(e, KeyError) else str(e)
        return f"{path}: not a readable Run ({type(e).__name__}: {what})"


def stamp_of(path: str) -> tuple[float, ...]:
    return _stamp(path)


def channel_rows(path: str, layer: str) -> pd.DataFrame | str | None:
    """One layer's rows of the Run's ``channels`` table; None when the Run predates it, the reason when the
    file cannot be read. Read again when the file changes (a resumed sweep writes it into an older Run)."""
    try:
        stamp = os.stat(Path(path) / "channels.parquet").st_mtime_ns
    except OSError:
        return None
    try:
        return _channel_rows(str(Path(path).resolve()), layer, stamp)
    except RunError as e:
        return str(e)


@st.cache_resource(show_spinner=False, max_entries=64)
def _channel_rows(path: str, layer: str, stamp: int) -> pd.DataFrame | None:
    return read_channels(path, layer)


@st.cache_resource(show_spinner=False, max_entries=8)
def report_html(path: str, stamp: tuple[float, ...], token: str) -> str:
    """The self-contained HTML report of a Run with the policy of URL ``token`` as its chosen policy."""
    from analysis.api import decode_url_token, policy_from_codes
    from analysis.api import render_html

    run = _load(path, stamp).run
    return render_html(run, policy_from_codes(run, decode_url_token(token, run).codes), "the dashboard's policy")


@st.cache_resource(show_spinner=False, max_entries=8)
def bundle_bytes(path: str, stamp: tuple[float, ...]) -> bytes:
    """The Run as a ``.qlrun`` bundle (no model weights)."""
    import tempfile

    from analysis.api import write_bundle

    with tempfile.TemporaryDirectory(prefix="quantlens-bundle-") as tmp:
        return write_bundle(path, Path(tmp) / "run.qlrun").read_bytes()


def open_uploaded_bundle(data: bytes, name: str) -> str:
    """Extract an uploaded bundle into a fresh temporary folder; returns the Run folder.

    Raises:
        BundleError: the bundle is refused (the message says why).
    """
    import re
    import tempfile

    from analysis.api import open_bundle

    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).stem)[:64] or "bundle"
    return str(open_bundle(data, Path(tempfile.mkdtemp(prefix="quantlens-bundles-")) / stem).path)


@st.cache_resource(show_spinner=False, max_entries=16)
def coupled(path: str, stamp: tuple[float, ...]) -> list[list[int]]:
    """Layer indices that read one tensor and so share a format (as ``quantlens search`` honours them)."""
    from analysis.api import coupled_groups

    return coupled_groups(_load(path, stamp).run)


@st.cache_resource(show_spinner="Finding the Pareto frontier (up to 40 exact solves)…", max_entries=16)
def frontier_frame(path: str, stamp: tuple[float, ...], axis: str = "size") -> pd.DataFrame:
    """Projected Pareto frontier of a Run, metric vs ``axis`` ("size" | "latency"); coupled groups honoured.

    Columns ``bytes``, ``latency_ms``, ``metric``, ``band``, ``codes`` (one array per point); empty when the
    search finds none or the Run lacks what the axis needs (measured latency).
    """
    from analysis.api import SearchError, pareto_frontier

    try:
        front = pareto_frontier(_load(path, stamp).projector, axis=axis, groups=coupled(path, stamp) or None)
    except SearchError:
        front = []
    return pd.DataFrame({"bytes": [r.projection.bytes for r in front], "metric": [r.projection.metric for r in front],
                         "latency_ms": [np.nan if r.projection.latency_ms is None else r.projection.latency_ms
                                        for r in front],
                         "band": [np.nan if r.projection.band is None else r.projection.band for r in front],
                         "codes": [r.codes for r in front]})


def _file_stamp(spec: object) -> int:
    try:
        return os.stat(str(spec)).st_mtime_ns if spec else -1
    except (OSError, ValueError):
        return -1


def verify_blocker(loaded: Loaded) -> str | None:
    """Why the Run's policy cannot be verified here (model or data not at hand, or changed), or None."""
    if loaded.synthetic:
        return "a synthetic Run has no model to run: its numbers are generated, not measured."
    m, d = loaded.run.meta.get("model", {}), loaded.run.meta.get("data", {})
    files = tuple(_file_stamp(x) for x in (m.get("source"), m.get("weights"), d.get("source")))
    return _model_check(loaded.path, _stamp(loaded.path)[0], files, loaded.run)


@st.cache_resource(show_spinner="Checking that the Run's model and data are at hand…", max_entries=16)
def _model_check(path: str, meta_stamp: float, files: tuple[int, ...], _run: Run) -> str | None:
    """The engine's own resolution (``resolve_task`` + ``resolve_model``, sha256 checked), once per Run version
    and model / data file version: it may export a torch model, too slow to repeat on every render."""
    from analysis.api import check_model_at_hand

    return check_model_at_hand(_run)


@st.cache_resource(show_spinner=False)
def verify_jobs():
    """Verify jobs of this server process, one per Run at a time (a verify rewrites the Run's policies table)."""
    from dashboard.jobs import VerifyJobs

    return VerifyJobs()
