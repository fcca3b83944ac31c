"""The public Python API: everything a script, a notebook or the dashboard uses, from one module.

Measure a model, then open, project, search, verify, report and share its Run::

    >>> from analysis.api import analyze, load_run, Projector, best_policy, policy_from_codes
    >>> run = analyze("demo:digits", "digits", "runs/digits")
    >>> best = best_policy(Projector(run), max_drop=0.005)
    >>> policy_from_codes(run, best.codes).to_json()

The packages below this one (``quant``, ``data``, ``models``, ``store``, ``engine``, ``runtime``,
``project``, ``report``) are internal: their layout may change, this module's names stay. What needs
torch or onnxruntime (measuring, verifying) is imported on first use, so opening Runs stays light.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from analysis.errors import InputError, ModelError
from analysis.project.groups import coupled_groups
from analysis.project.projection import Projection, Projector
from analysis.project.search import SearchError, SearchResult, best_policy, pareto_frontier
from analysis.project.selection import (LayerMatch, fp32_for_most_sensitive, layer_types, layers_of_type,
                                        match_layers, most_sensitive, with_format)
from analysis.quant.formats import get_format
from analysis.report.render import ReportError, render_html, render_markdown, write_report
from analysis.store.bundle import BundleError, open_bundle, write_bundle
from analysis.store.channels import OUTLIER_RATIO, channel_formats, read_channels, sqnr_column, step_column
from analysis.store.policy import (FORMAT_CODE, POLICY_FORMATS, Policy, PolicyError, decode_url_token, encode_codes,
                                   from_json, match_policy, policy_from_codes)
from analysis.store.run import TABLES, Run, RunError, load_run, update_meta
from analysis.store.writer import RunBusy, run_writer

__all__ = [
    "AnalysisError", "BundleError", "FORMAT_CODE", "InputError", "LayerMatch", "ModelError", "OUTLIER_RATIO",
    "POLICY_FORMATS", "Policy", "PolicyError", "Projection", "Projector", "ReportError", "Run", "RunBusy",
    "RunError", "SearchError", "SearchResult", "TABLES", "VerifyError", "analyze", "apply_policy", "best_policy",
    "channel_formats", "check_model_at_hand", "coupled_groups", "cpu_info", "decode_url_token", "encode_codes",
    "fp32_for_most_sensitive", "from_json", "get_format", "layer_types", "layers_of_type", "load_run",
    "match_layers", "match_policy", "most_sensitive", "open_bundle", "pareto_frontier", "policy_from_codes",
    "read_channels", "render_html", "render_markdown", "run_writer", "sqnr_column", "step_column", "verify_policy",
    "versions", "with_format", "write_bundle", "write_report",
]


DEFAULT_VERIFIED = 4  # random mixed policies verified in onnxruntime by analyze, besides the uniform ones
VERIFIED_SUFFIX = " (onnxruntime)"

_LAZY = {"AnalysisError": "analysis.engine.analyze", "cpu_info": "analysis.engine.analyze",
         "versions": "analysis.engine.analyze", "VerifyError": "analysis.runtime.verify",
         "apply_policy": "analysis.runtime.verify"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'analysis.api' has no attribute '{name}'")


def analyze(model: str, task: str = "digits", out: str | os.PathLike = "runs/run", *, latency: bool = True,
            verify_policies: int = DEFAULT_VERIFIED, threads: int | None = None, progress: bool = True,
            latency_budget: float | None = None, latency_method: str = "profile", **options) -> Run:
    """Measure every quantizable layer of ``model`` under each format on ``task``; write a Run at ``out``.

    Two measurements, one after the other: the sensitivity sweep (``analysis.engine.analyze.sweep_to_run``,
    whose keyword options this takes: formats, calib, seed, observer, group_size, metric, weights,
    incremental, overwrite, executor, workers, ray_address, resume, chunk_size, random_policies), then,
    with ``latency``, per-layer and end-to-end latency in onnxruntime (within ``latency_budget`` seconds when
    given: single-layer models not timed by then are recorded as not measured, see
    ``analysis.runtime.latency.measure_latency``; ``latency_method`` is ``profile``, per-layer times from one
    profiled run of each uniform model, or ``pairs``, one single-layer model per layer and format), then the
    uniform policies and
    ``verify_policies`` of the random mixed ones verified in onnxruntime, so the projection is fitted
    to the model as shipped (0 turns that off). If the runtime cannot take the model, the sensitivity
    Run stands and ``run.json`` says why latency or the runtime check is missing.

    Returns:
        The Run as written (same as ``load_run(out)``).

    Raises:
        RunBusy: another process is writing the Run at ``out`` (one writer per Run, ``analysis.store.writer``).
    """
    from analysis.engine.analyze import sweep_to_run

    if latency_budget is not None and not (isinstance(latency_budget, (int, float)) and latency_budget > 0):
        raise InputError(f"latency_budget={latency_budget!r}: must be a positive number of seconds")
    if latency_method not in ("profile", "pairs"):
        raise InputError(f"latency_method={latency_method!r}: known: profile, pairs")
    with contextlib.ExitStack() as writer:  # the sweep's writer lock, held until latency and the check are in
        run = sweep_to_run(model, task, out, threads=threads, progress=progress, writer=writer, **options)
        if latency:
            _measure_latency(run, threads or 1, progress, latency_budget, latency_method)
            run = load_run(Path(out))
        if verify_policies > 0:
            _verify_sweep_policies(run, verify_policies, threads or 1, progress)
            run = load_run(Path(out))
    return run


def _verify_sweep_policies(run: Run, k: int, threads: int, progress: bool) -> None:
    """Measure the uniform policies and ``k`` random mixed ones in onnxruntime: the rows the projection
    is then fitted to (``Projector``), instead of the sweep's own fake-quant of the same policies."""
    pol = run.policies
    chosen = [r for r in pol.itertuples(index=False) if r.kind == "uniform"]
    chosen += [r for r in pol.itertuples(index=False) if r.kind == "random"][:k]
    say = (lambda s: print(f"verify: {s}", file=sys.stderr)) if progress else None
    done = 0
    try:
        for i, r in enumerate(chosen, start=1):
            if say:
                say(f"{i}/{len(chosen)} {r.name} in onnxruntime")
            layers = json.loads(r.layers_json) if r.layers_json else {}
            verify_policy(run, Policy(run.model_sha256, layers), name=f"{r.name}{VERIFIED_SUFFIX}", kind="verified",
                          threads=threads, repeats=0)
            done += 1
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - the runtime check is reported, not fatal: the engine's Run stands
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        update_meta(run, runtime_check={"verified": done, "error": reason})
        print(f"note: policies not verified in onnxruntime ({reason}); projections are the engine's", file=sys.stderr)
        return
    update_meta(run, runtime_check={"verified": done, "policies": [f"{r.name}{VERIFIED_SUFFIX}" for r in chosen]})


def _measure_latency(run: Run, threads: int, progress: bool, budget: float | None = None,
                     method: str = "profile") -> None:
    from analysis.runtime.latency import measure_latency

    say = (lambda s: print(f"latency: {s}", file=sys.stderr)) if progress else None
    try:
        measure_latency(run, threads=threads, progress=say, latency_budget=budget, progress_bar=progress,
                        method=method)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - any runtime failure is reported, not fatal
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        update_meta(run, latency={"error": reason})
        print(f"note: latency not measured ({reason})", file=sys.stderr)


def projected_for(run: Run, formats: dict[str, str]) -> dict:
    """What the Run's projection says for ``{layer: format}``: ``metric``, ``band`` (NaN if unknown), ``latency_ms``."""
    codes = np.array([FORMAT_CODE[formats.get(n, "fp32")] for n in run.layer_names])
    p = Projector(run).project(codes)
    return {"metric": p.metric, "band": p.band if p.band is not None else float("nan"), "latency_ms": p.latency_ms}


def verify_policy(run, policy, progress=None, **options) -> dict:
    """Apply ``policy``, measure it in onnxruntime, store the row beside the Run's projection for it.

    See ``analysis.runtime.verify.verify_policy`` for the options and the returned fields.
    """
    from analysis.runtime.verify import verify_policy as measure

    return measure(run, policy, progress, projected=projected_for, **options)


def check_model_at_hand(run: Run) -> str | None:
    """Why the Run's model or data cannot be used for verify (changed or missing), or None when they can."""
    from analysis.runtime.session import resolve_model, resolve_task

    try:
        resolve_model(run, resolve_task(run))
    except (ValueError, OSError, ImportError) as e:
        return str(e) or type(e).__name__
    return None
