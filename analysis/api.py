"""``analyze``: from a model and a task to a Run folder.

Example:
    >>> from analysis import analyze
    >>> run = analyze("demo:digits", "digits", "runs/digits")
    >>> run.sensitivity.sort_values("loss_delta").tail(3)
"""
from __future__ import annotations

import json
import math
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.cost import cost_table, policy_bytes
from analysis.formats import FP32, get_format, with_group_size, with_observer
from analysis.models.loading import load_model
from analysis.run import Run, RunError, write_run
from analysis.primitives import sqnr_db
from analysis.stats import calibrate, statistics_tables, weight_sqnr
from analysis.tasks import load_task

VERSION = "0.1.0"


class AnalysisError(ValueError):
    """Bad input to ``analyze``; the message names the file or field."""


def cpu_info() -> dict:
    """CPU model and the instruction-set flags that decide integer-kernel speed."""
    info = {"machine": platform.machine(), "model": platform.processor() or "", "logical_cpus": torch.get_num_threads()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and not info["model"].strip(" x86_64"):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["isa"] = sorted(flags & {"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "f16c"})
                break
        import os

        info["logical_cpus"] = os.cpu_count()
    except OSError:
        pass
    info["torch_threads"] = torch.get_num_threads()
    return info


def versions() -> dict:
    import onnxruntime
    import pyarrow

    return {"quantlens": VERSION, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": np.__version__, "pandas": pd.__version__, "pyarrow": pyarrow.__version__,
            "onnxruntime": onnxruntime.__version__}


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AnalysisError(f"--out {out}: exists and is not empty (choose another folder or pass --overwrite)")


def analyze(model: str, task: str = "digits", out: str | Path = "runs/run", *, formats=("int8", "int4"),
            calib: int | None = None, seed: int = 0, observer: str = "minmax", group_size: int | None = None,
            metric: str | None = None, weights: str | None = None, incremental: bool = True,
            overwrite: bool = False, threads: int | None = None, progress: bool = True) -> Run:
    """Measure every quantizable layer of ``model`` under each format on ``task``; write a Run.

    Args:
        model: ``demo:digits`` or ``package.module:factory``.
        task: a bundled task name (``digits``) or an ``.npz`` with ``inputs`` [and ``labels``].
        out: the Run folder to create (must be absent or empty unless ``overwrite``).
        formats: registered format names to sweep (fp32 is always the reference).
        calib: number of calibration samples; observer: minmax | percentile | mse.
        incremental: recompute only downstream of each perturbed layer when the model traces.

    Returns:
        The Run as written (same as ``load_run(out)``).
    """
    out = Path(out)
    _check_out(out, overwrite)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if isinstance(formats, str):
        formats = [f for f in formats.split(",") if f]
    fmts = []
    for name in formats:
        try:
            fmt = get_format(name.strip())
        except KeyError as e:
            raise AnalysisError(f"--formats: {e.args[0]}") from None
        if fmt.is_float:
            continue
        fmt = with_observer(fmt, observer) if fmt.activation else fmt
        fmts.append(with_group_size(fmt, group_size) if group_size else fmt)
    if not fmts:
        raise AnalysisError("--formats: name at least one quantized format")
    t = load_task(task, metric=metric, calib=calib, seed=seed)
    example = torch.from_numpy(t.eval_inputs[:2])
    tm = load_model(model, example, weights=weights, source_hint=t.source)
    with torch.no_grad():
        y = tm.run(example)
    m = t.resolve_metric(tuple(y.shape))
    layers = tm.layers()

    stats = tm.activation_stats(t.calib_batches)
    calibrate(tm, stats, fmts)
    skip = {(l.name, f.name): r for l in layers for f in fmts if (r := tm.skip_reason(l.name, f))}
    jobs = [(l.name, f.name) for l in layers for f in fmts if (l.name, f.name) not in skip]
    uniform = {f.name: {l.name: f.name for l in layers if (l.name, f.name) not in skip} for f in fmts}

    n_batches = math.ceil(len(t.eval_inputs) / t.batch_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_batches * (len(jobs) + len(uniform)), desc="sweep", unit="job", file=sys.stderr, leave=False)
    try:
        res = tm.sweep(t, m.name, jobs, {f"uniform:{k}": v for k, v in uniform.items()},
                       incremental=incremental, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()

    base = res.baseline.result()
    sens_rows = []
    for l in layers:
        for f in fmts:
            row = {"layer": l.name, "format": f.name}
            if (l.name, f.name) in skip:
                row.update(status="skipped", reason=skip[(l.name, f.name)], metric=np.nan, metric_delta=np.nan,
                           loss=np.nan, loss_delta=np.nan, kl=np.nan, output_sqnr_db=np.nan, weight_sqnr_db=np.nan)
            else:
                jr = res.jobs[(l.name, f.name)]
                r = jr.state.result()
                W = tm.weight(l.name)
                row.update(status="ok", reason="", metric=r["metric"], metric_delta=r["metric"] - base["metric"],
                           loss=r["loss"], loss_delta=r["loss"] - base["loss"], kl=r["kl"],
                           output_sqnr_db=sqnr_db(jr.signal, jr.noise),
                           weight_sqnr_db=weight_sqnr(W, tm.fake_weight(l.name, f)) if f.weight else math.inf)
            sens_rows.append(row)
    sensitivity = pd.DataFrame(sens_rows)
    layers_df = pd.DataFrame([{"name": l.name, "type": l.type, "order": l.order, "weight_shape": l.weight_shape_str,
                               "params": l.params, "macs": l.macs, "in_features": l.in_features,
                               "out_features": l.out_features, "reaches_output": res.reaches_output[l.name]}
                              for l in layers])
    histograms, clipping = statistics_tables(tm, stats, fmts)
    cost = cost_table(layers, [FP32, *fmts], skip)
    other = tm.other_bytes()
    fp32_bytes = policy_bytes(cost, {}, other)
    pol_rows = [{"name": "fp32", "kind": "baseline", "layers_json": "{}", "metric": base["metric"], "loss": base["loss"],
                 "bytes": fp32_bytes, "latency_ms": np.nan, "measured_on": f"torch, {len(t.eval_inputs)} eval samples",
                 "projected_metric": np.nan, "projected_band": np.nan}]
    uniform_meta = {}
    for f in fmts:
        r = res.policies[f"uniform:{f.name}"].result()
        b = policy_bytes(cost, uniform[f.name], other)
        pol_rows.append({"name": f"all-{f.name}", "kind": "uniform", "layers_json": json.dumps(uniform[f.name], sort_keys=True),
                         "metric": r["metric"], "loss": r["loss"], "bytes": b, "latency_ms": np.nan,
                         "measured_on": f"torch fake-quant, {len(t.eval_inputs)} eval samples",
                         "projected_metric": np.nan, "projected_band": np.nan})
        uniform_meta[f.name] = {"metric": r["metric"], "loss": r["loss"], "kl": _finite(r["kl"]), "bytes": b,
                                "skipped_layers": sorted(l for (l, fn) in skip if fn == f.name)}
    policies = pd.DataFrame(pol_rows)
    meta = {
        "status": "complete",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": tm.name, "kind": tm.kind, "source": tm.source, "sha256": tm.sha256, "params": tm.params(),
                  "fp32_bytes": fp32_bytes, "other_bytes": other, "n_layers": len(layers)},
        "data": {"task": t.name, "source": t.source, "sha256": t.sha256, "n_calib": int(len(t.calib_inputs)),
                 "n_eval": int(len(t.eval_inputs)), "input_shape": list(t.eval_inputs.shape[1:]),
                 "labels": t.eval_labels is not None},
        "metric": {"name": m.name, "higher_is_better": m.higher_is_better, "loss": m.loss, "description": m.description},
        "formats": [f.name for f in fmts],
        "format_specs": {f.name: f.to_dict() for f in [FP32, *fmts]},
        "observer": observer,
        "baseline": {"metric": base["metric"], "loss": base["loss"], "bytes": fp32_bytes},
        "uniform": uniform_meta,
        "sweep": {"path": res.path, "path_reason": res.path_reason, "jobs": len(jobs), "skipped": len(skip),
                  "batches": res.batches, "seconds": round(res.seconds, 3), "incremental_requested": incremental},
        "versions": versions(),
        "seed": seed,
        "cpu": cpu_info(),
    }
    try:
        return write_run(out, meta, {"layers": layers_df, "sensitivity": sensitivity, "histograms": histograms,
                                     "clipping": clipping, "cost": cost, "policies": policies}, overwrite=overwrite)
    except RunError as e:
        raise AnalysisError(str(e)) from None
