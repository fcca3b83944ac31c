"""Latency measured in onnxruntime (CPU provider) on real INT8/INT4 kernels.

Everything is timed at ``ORT_ENABLE_ALL``, as deployed, on one fixed batch of the task's
evaluation inputs, with models timed round-robin (one run each per round) so drift on a
shared machine hits all of them alike:

* **End to end**: wall time of ``session.run`` for the FP32 model, each uniform-format model
  and any policy.
* **Per layer x format**, by one of two methods:

  ``profile`` (the default): each uniform model (all layers in one format) and the FP32 model run
  once more under onnxruntime's profiler, as optimised for deployment; each node of the optimised
  graph is attributed to the layer it works for (``analysis.runtime.attribution``), so a layer's
  latency in a format is the kernel time of its nodes in that format's model (node times read as
  shares of the model's measured run time: the profiler's wall clock counts preemption), plus the change it
  causes in the nodes between it and the next layer (its Relu folded away, a pooling that now runs
  on uint8). One model per format is built, not one per layer. What is left, the uniform model's
  measured end-to-end change less the sum of its layers' changes, is recorded per format
  (``latency.uniform.<format>.residual_ms``): session overhead, nodes before the first layer, and
  timing noise. It is not spread over the layers, where noise would pass for a measurement.

  ``pairs``: the model with only that layer quantized (real kernels:
  QOperator ``QLinearConv``/``QGemm``/``QLinearMatMul``, ``MatMulNBits``, blocked uint4
  ``DequantizeLinear``), timed against FP32 in the same rounds; the layer's latency is its
  FP32 kernel time plus the median paired difference. Node profiles alone mislead here: the
  optimiser fuses and re-lays-out FP32 convolutions (NCHWc) but not all quantized ones, so
  what quantizing a layer really changes shows only in the whole graph. The FP32 kernel time
  comes from node profiling at ``ORT_DISABLE_ALL`` (one node per layer).

Median and spread (interquartile range) are over the repeats; times are ms per batch. With one
thread, onnxruntime runs a model on the calling thread, and a run's time is that thread's CPU time
(``time.thread_time``): on shared cores the scheduler preempts runs for milliseconds, which wall
time counts and CPU time does not; on an idle machine the two agree. With more threads, wall time.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from analysis.runtime.attribution import attach, attribute, layer_kernel_times, profile
from analysis.runtime.onnx_quantize import QuantizedModel, layer_nodes, quantize_model
from analysis.store.atomic import folder_lock
from analysis.store.run import Run, load_run, read_table, replace_table, update_meta
from analysis.runtime.session import RuntimeModel, resolve_model, resolve_task, run_formats

PROVIDER = "CPUExecutionProvider"
LATENCY_METHODS = ("profile", "pairs")
TIMING_CALIB_SAMPLES = 4


def _options(threads: int, level, profile_dir: str | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if profile_dir:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(profile_dir) / "ort")
    return so


def session(model: onnx.ModelProto, threads: int = 1, *, profile_dir: str | None = None) -> ort.InferenceSession:
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if profile_dir else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), _options(threads, level, profile_dir), providers=[PROVIDER])


def _stats(values_ms: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values_ms, dtype=float)
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return float(med), float(q3 - q1)


def run_clock(threads: int):
    """The clock a run is timed with: the calling thread's CPU time with one thread (onnxruntime then runs
    on it, and preemption by other work is not counted), wall time with more."""
    return time.thread_time if threads == 1 else time.perf_counter


def timed_runs(models: dict, feed: dict[str, np.ndarray], *, threads: int = 1, repeats: int = 30,
               warmup: int = 3) -> dict[str, np.ndarray]:
    """Wall times (ms) of ``repeats`` runs per model, timed round-robin in one loop.

    ``models`` values are ONNX models or ready ``InferenceSession``s (reused, e.g. the FP32 one)."""
    sessions = {k: m if isinstance(m, ort.InferenceSession) else session(m, threads) for k, m in models.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    times: dict[str, list[float]] = defaultdict(list)
    clock = run_clock(threads)
    for _ in range(repeats):
        for k, s in sessions.items():
            t0 = clock()
            s.run(None, feed)
            times[k].append((clock() - t0) * 1e3)
    return {k: np.asarray(v) for k, v in times.items()}


def end_to_end(models: dict[str, onnx.ModelProto], feed: dict[str, np.ndarray], *, threads: int = 1,
               repeats: int = 30, warmup: int = 3) -> dict[str, tuple[float, float]]:
    """``{name: (median ms, IQR ms)}`` per model, timed round-robin in one loop."""
    return {k: _stats(v) for k, v in timed_runs(models, feed, threads=threads, repeats=repeats, warmup=warmup).items()}


def node_times(model: onnx.ModelProto, feed: dict[str, np.ndarray], *, threads: int = 1, repeats: int = 30,
               warmup: int = 3) -> dict[str, list[float]]:
    """Per node name, its kernel time (ms) in each profiled repeat (``ORT_DISABLE_ALL``)."""
    with tempfile.TemporaryDirectory(prefix="quantlens-prof-") as tmp:
        s = session(model, threads, profile_dir=tmp)
        for _ in range(warmup + repeats):
            s.run(None, feed)
        path = s.end_profiling()
        events = json.loads(Path(path).read_text())
    out: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            out[e["name"][: -len("_kernel_time")]].append(e["dur"] / 1e3)
    return {k: v[warmup:] if len(v) > warmup else v for k, v in out.items()}


def layer_times(rm: RuntimeModel, qm: QuantizedModel | None, times: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """Per ONNX layer: (median, IQR) ms of the nodes that carry it out (shared nodes split evenly)."""
    model = qm.model if qm else rm.model
    owners: dict[str, list[str]] = defaultdict(list)
    nodes_of = {}
    for l in rm.layers:
        nodes_of[l.name] = [n.name for n in layer_nodes(model, l)]
        for n in nodes_of[l.name]:
            owners[n].append(l.name)
    out = {}
    for l in rm.layers:
        names = [n for n in nodes_of[l.name] if n in times]
        if not names:
            continue
        reps = min(len(times[n]) for n in names)
        per_rep = [sum(times[n][r] / len(owners[n]) for n in names) for r in range(reps)]
        out[l.name] = _stats(per_rep)
    return out


def uniform_policy(run: Run, fmt: str) -> dict[str, str]:
    """Every layer the sweep measured in ``fmt`` (the Run's own all-<fmt> policy)."""
    sens = run.sensitivity
    ok = sens[(sens["format"] == fmt) & (sens["status"] == "ok")]
    return {str(n): fmt for n in ok["layer"]}


def measure_latency(run: Run | str | os.PathLike, *, repeats: int = 50, warmup: int = 3, batch: int = 32,
                    threads: int = 1, progress: Callable[[str], None] | None = None,
                    time_budget_s: float = 60.0, latency_budget: float | None = None,
                    progress_bar: bool = False, method: str = "profile") -> dict:
    """Measure per-layer and end-to-end latency of a Run's model in onnxruntime; store them in the Run.

    Fills the ``cost`` table's ``latency_ms`` / ``latency_spread_ms`` / ``latency_source`` for every
    (layer, format) row, the ``latency_ms`` of the fp32 and uniform rows of ``policies``, and
    ``run.json`` ``latency``.

    Args:
        run: a Run or its folder. Its model and task data must be at hand (see ``analysis.runtime.session``).
        repeats, warmup: timed and untimed runs per model; batch: evaluation samples per run.
        threads: onnxruntime intra-op threads (1 is fastest for small models on shared cores).
        time_budget_s: rough bound on the time spent on each of: timing the whole models (at least 10
            repeats), profiling them (at least 5), and timing single-layer models (``pairs``, at least 5
            paired repeats); small models get the full ``repeats``.
        latency_budget: seconds for the whole measurement, or None. The FP32 and uniform models and the
            FP32 kernel profile are always timed; single-layer models are timed while the budget lasts
            (fewer paired repeats first), and those left are recorded as not measured: NaN latency in
            ``cost`` with the reason in ``latency_source`` and in run.json ``latency.not_measured``.
        method: ``profile`` (per-layer times from one profiled run of each uniform model) or ``pairs``
            (one single-layer model per layer x format, timed against FP32; budgets apply to these).
        progress: optional callable receiving one line per step.
        progress_bar: a tqdm bar with ETA on stderr over the single-layer models.

    Returns:
        The ``latency`` dict written to run.json.

    Example:
        >>> measure_latency("runs/digits")["uniform"]["int8"]["ratio_vs_fp32"]
    """
    if method not in LATENCY_METHODS:
        raise ValueError(f"latency method {method!r}: known: {', '.join(LATENCY_METHODS)}")
    if latency_budget is not None and not latency_budget > 0:
        raise ValueError(f"latency_budget={latency_budget}: must be a positive number of seconds")
    t_start = time.perf_counter()
    deadline = None if latency_budget is None else t_start + latency_budget
    run = run if isinstance(run, Run) else load_run(run)
    say = progress or (lambda s: None)
    task = resolve_task(run)
    rm = resolve_model(run, task)
    x = task.eval_inputs[: max(1, batch)]
    feed = rm.binding.first_feed(x)
    # kernel speed does not depend on the exact activation scales: a few calibration samples set them
    # for timing models (the metric of a quantized model is measured by verify, on the full calibration set)
    calib = task.calib_inputs[:TIMING_CALIB_SAMPLES]
    models: dict[str, onnx.ModelProto] = {"fp32": rm.model}
    built: dict[str, QuantizedModel] = {}
    for fmt in run.formats:
        say(f"building all-{fmt} model")
        uniform = uniform_policy(run, fmt)
        built[fmt] = quantize_model(rm.model, rm.layers, rm.onnx_policy(uniform), rm.binding, calib,
                                    rm.onnx_quantizers(run, uniform), run_formats(run))
        models[f"all-{fmt}"] = built[fmt].model
    # a large model on a large batch takes seconds a run: repeats shrink to fit time_budget_s (10 at least)
    first = session(rm.model, threads)
    clock = run_clock(threads)
    t0 = clock()
    first.run(None, feed)
    one_s = max(clock() - t0, 1e-6)
    whole_repeats = int(np.clip(time_budget_s / (one_s * len(models)), min(10, repeats), repeats))
    say(f"timing {len(models)} whole models round-robin ({whole_repeats} repeats)")
    times = timed_runs({**models, "fp32": first}, feed, threads=threads, repeats=whole_repeats, warmup=warmup)
    if method == "profile":
        # per-node medians settle in fewer runs than whole-model times: half the budget, 5 runs at least
        profile_repeats = int(np.clip(time_budget_s / 2 / (one_s * len(models)), min(5, repeats), repeats))
        t_profile = time.perf_counter()
        meta = _profiled_layers(run, rm, models, times, feed, threads=threads, repeats=profile_repeats,
                                warmup=min(warmup, 2), say=say, progress_bar=progress_bar)
        meta.update(profile_repeats=profile_repeats, whole_repeats=whole_repeats,
                    per_layer_seconds=round(time.perf_counter() - t_profile, 3))
        return _store(run, rm, built, times, meta, threads, len(x), repeats, warmup, latency_budget, t_start)
    del models
    say("profiling fp32 kernels")
    fp32_layer = layer_times(rm, None, node_times(rm.model, feed, threads=threads, repeats=repeats, warmup=warmup))
    sens = run.sensitivity
    jobs = [(str(r.layer), str(r.format)) for r in sens[sens["status"] == "ok"].itertuples()
            if str(r.layer) in rm.to_onnx]
    # one quantized model at a time, timed in pairs against the same FP32 session: memory stays at two
    # models whatever the layer count, and the per-layer timing effort is bounded by time_budget_s
    fp32_session = session(rm.model, threads)
    one_ms = float(np.median(times["fp32"]))
    per_layer_s = time_budget_s if deadline is None else max(0.0, min(time_budget_s, deadline - time.perf_counter()))
    pair_repeats = int(np.clip(per_layer_s * 1e3 / (2 * one_ms * max(len(jobs), 1)), min(5, repeats), repeats))
    kernel_of: dict[str, str] = {}
    say(f"timing {len(jobs)} single-layer models against fp32 ({pair_repeats} paired repeats each)")
    bar = _layer_bar(len(jobs)) if progress_bar and jobs else None
    job_s: list[float] = []
    for layer, fmt in jobs:
        if _out_of_budget(deadline, job_s):
            break
        t_job = time.perf_counter()
        q = quantize_model(rm.model, rm.layers, {rm.to_onnx[layer]: fmt}, rm.binding, calib,
                           rm.onnx_quantizers(run, {layer: fmt}), run_formats(run))
        pair = timed_runs({"fp32": fp32_session, "q": q.model}, feed, threads=threads, repeats=pair_repeats,
                          warmup=min(warmup, 2))
        times[f"{layer}|{fmt}"] = pair["q"] - pair["fp32"]
        kernel_of[f"{layer}|{fmt}"] = q.kernels.get(rm.to_onnx[layer], "?")
        del q
        job_s.append(time.perf_counter() - t_job)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    untimed = [f"{layer}|{fmt}" for layer, fmt in jobs if f"{layer}|{fmt}" not in times]
    why_untimed = (f"the latency budget of {latency_budget:g} s ran out after {len(jobs) - len(untimed)} of "
                   f"{len(jobs)} single-layer models" if untimed else "")
    if untimed:
        say(f"{why_untimed}: {len(untimed)} left unmeasured (their latency is unknown, not zero)")

    version = ort.__version__
    where = f"{threads} thread(s), batch {len(x)}"
    cost = run.cost.copy()
    for i, r in cost.iterrows():
        layer, fmt = str(r["layer"]), str(r["format"])
        onnx_name = rm.to_onnx.get(layer)
        if onnx_name is None or onnx_name not in fp32_layer:
            continue
        base, base_spread = fp32_layer[onnx_name]
        if fmt == "fp32":
            kernel = next(n.op_type for n in layer_nodes(rm.model, rm.by_onnx[onnx_name]))
            cost.at[i, "latency_ms"], cost.at[i, "latency_spread_ms"] = base, base_spread
            cost.at[i, "latency_source"] = f"onnxruntime {version} CPU node profile: {kernel}, {where}"
        elif f"{layer}|{fmt}" in times:
            delta, spread = _stats(times[f"{layer}|{fmt}"])
            cost.at[i, "latency_ms"], cost.at[i, "latency_spread_ms"] = base + delta, spread
            cost.at[i, "latency_source"] = (f"onnxruntime {version} CPU end-to-end delta vs fp32: "
                                            f"{kernel_of[f'{layer}|{fmt}']}, {where}")
        elif f"{layer}|{fmt}" in untimed:  # NaN, never an earlier measurement's value or zero
            cost.at[i, "latency_ms"], cost.at[i, "latency_spread_ms"] = np.nan, np.nan
            cost.at[i, "latency_source"] = f"not measured: {why_untimed}"
    meta = {"cost": cost, "pair_repeats": pair_repeats, "per_layer_method": "pairs", "whole_repeats": whole_repeats,
            "method": "end to end: session.run wall time, fp32 and uniform models timed round-robin; per layer x "
                      "format: FP32 kernel time (node profile, ORT_DISABLE_ALL) + median paired end-to-end difference "
                      "between the model with only that layer quantized and FP32, timed in alternation"}
    if untimed:
        meta["not_measured"] = {"reason": why_untimed, "count": len(untimed), "of": len(jobs), "layers": untimed}
    return _store(run, rm, built, times, meta, threads, len(x), repeats, warmup, latency_budget, t_start)


def _store(run: Run, rm: RuntimeModel, built: dict, times: dict, meta: dict, threads: int, batch: int,
           repeats: int, warmup: int, latency_budget: float | None, t_start: float) -> dict:
    """Write the cost table (``meta["cost"]``), the fp32/uniform policies' latency and run.json ``latency``."""
    cost = meta.pop("cost")
    version = ort.__version__
    fp32_ms, fp32_spread = _stats(times["fp32"])
    uniform = {}
    for fmt in run.formats:
        ms, spread = _stats(times[f"all-{fmt}"])
        uniform[fmt] = {"ms": ms, "spread_ms": spread, "ratio_vs_fp32": ms / fp32_ms,
                        "kernels": dict(sorted(Counter(built[fmt].kernels.values()).items())), "notes": built[fmt].notes}
        if fmt in meta.get("residual_ms", {}):
            uniform[fmt]["residual_ms"] = meta["residual_ms"][fmt]
    meta.pop("residual_ms", None)
    out = {
        "fp32_ms": fp32_ms, "fp32_spread_ms": fp32_spread, "uniform": uniform,
        "threads": threads, "provider": PROVIDER, "onnxruntime": version, "batch": int(batch),
        "repeats": repeats, "warmup": warmup, "unit": f"ms per batch of {batch}", "spread": "interquartile range",
        "graph_optimization": "ORT_ENABLE_ALL",
        "model": "exported from torch with torch.onnx" if rm.exported else "the Run's ONNX file",
        "budget_s": latency_budget, "seconds": round(time.perf_counter() - t_start, 3), **meta,
    }
    replace_table(run, "cost", cost)
    _store_policy_latency(run, fp32_ms, {fmt: u["ms"] for fmt, u in uniform.items()})
    update_meta(run, latency=out)
    return out


def _profiled_layers(run: Run, rm: RuntimeModel, models: dict, times: dict, feed: dict, *, threads: int,
                     repeats: int, warmup: int, say, progress_bar: bool) -> dict:
    """Per-layer latency from one profiled run of the FP32 model and of each uniform model (``profile``)."""
    names = list(models)
    bar = _layer_bar(len(names), unit="model") if progress_bar else None
    per: dict[str, dict[str, tuple[float, float, str]]] = {}  # the layers' own nodes
    near: dict[str, dict[str, tuple[float, float, str]]] = {}  # the nodes attached to them
    scale: dict[str, float] = {}  # measured run time / profiled node time, per model
    say(f"profiling {len(names)} models: {', '.join(names)}")
    for name in names:
        node_ms, ops, optimized = profile(models[name], feed, threads=threads, repeats=repeats, warmup=warmup)
        # the profiler reports wall time, which preemption on shared cores inflates; the whole model's run time
        # was measured robustly (``run_clock``): node times are read as shares of it
        reps = min((len(v) for v in node_ms.values()), default=0)
        total = float(np.median([sum(v[r] for v in node_ms.values()) for r in range(reps)])) if reps else 0.0
        scale[name] = float(np.median(times[name]) / total) if total > 0 else 1.0
        node_ms = {k: [t * scale[name] for t in v] for k, v in node_ms.items()}
        owner = attribute(optimized, rm.layers)
        per[name] = layer_kernel_times(node_ms, ops, owner, rm.layers)
        near[name] = layer_kernel_times(node_ms, ops, attach(optimized, owner), rm.layers)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    fp32 = per["fp32"]
    attached_ms = lambda name, l: near[name][l][0] if l in near[name] else 0.0  # noqa: E731
    change: dict[str, dict[str, float]] = {}  # format -> layer -> change of what is attached to it vs fp32
    residual = {}
    for fmt in run.formats:
        own = per[f"all-{fmt}"]
        layers = [rm.to_onnx[l] for l in uniform_policy(run, fmt) if rm.to_onnx.get(l) in own and rm.to_onnx[l] in fp32]
        change[fmt] = {l: attached_ms(f"all-{fmt}", l) - attached_ms("fp32", l) for l in layers}
        attributed = sum(own[l][0] - fp32[l][0] + change[fmt][l] for l in layers)
        residual[fmt] = float(np.median(times[f"all-{fmt}"]) - np.median(times["fp32"]) - attributed)
    version = ort.__version__
    where = f"{threads} thread(s), batch {len(next(iter(feed.values())))}"
    cost = run.cost.copy()
    for i, r in cost.iterrows():
        layer, fmt = str(r["layer"]), str(r["format"])
        onnx_name = rm.to_onnx.get(layer)
        src = per.get("fp32" if fmt == "fp32" else f"all-{fmt}", {})
        if onnx_name is None or onnx_name not in fp32 or (fmt != "fp32" and onnx_name not in change.get(fmt, {})):
            if fmt == "fp32" or fmt in change:
                cost.at[i, "latency_ms"], cost.at[i, "latency_spread_ms"] = np.nan, np.nan
                cost.at[i, "latency_source"] = "not measured: no node of this layer in the profiled model"
            continue
        ms, spread, kernels = src[onnx_name]
        around = 0.0 if fmt == "fp32" else change[fmt][onnx_name]
        cost.at[i, "latency_ms"], cost.at[i, "latency_spread_ms"] = ms + around, spread
        cost.at[i, "latency_source"] = (f"onnxruntime {version} CPU profile of the "
                                        f"{'fp32' if fmt == 'fp32' else 'all-' + fmt} model: {kernels}, {where}"
                                        + ("" if fmt == "fp32" else f"; {around:+.4f} ms in the nodes after it"))
    return {"cost": cost, "residual_ms": residual, "per_layer_method": "profile", "profile_scale": scale,
            "method": "end to end: session.run wall time, fp32 and uniform models timed round-robin; per layer x "
                      "format: kernel time of the layer's nodes in one profiled run of the format's uniform model "
                      "(ORT_ENABLE_ALL, nodes attributed by name, weights and quantize/dequantize neighbours), plus "
                      "the change, against the FP32 model, of the nodes between it and the next layer; "
                      "uniform.<format>.residual_ms: the uniform model's end-to-end change that the layers' changes "
                      "do not account for"}


def _layer_bar(total: int, unit: str = "model"):
    """A tqdm bar on stderr over the models timed or profiled, with its ETA."""
    from tqdm import tqdm

    return tqdm(total=total, desc="latency", unit=unit, file=sys.stderr, leave=False)


def _out_of_budget(deadline: float | None, job_s: list[float]) -> bool:
    """Whether the next single-layer model would end past ``deadline`` (judged by the ones timed so far)."""
    if deadline is None:
        return False
    return time.perf_counter() + (float(np.mean(job_s)) if job_s else 0.0) > deadline


def _store_policy_latency(run: Run, fp32_ms: float, uniform_ms: dict[str, float]) -> None:
    """The fp32 and uniform rows of ``policies`` get their latency; read and rewritten under the Run's
    lock, so a row a verify adds meanwhile (see ``merge_policy_rows``) is kept."""
    with folder_lock(run.path):
        pol = read_table(run, "policies")
        for i, r in pol.iterrows():
            name = str(r["name"])
            if r["kind"] == "baseline" and name == "fp32":
                pol.at[i, "latency_ms"] = fp32_ms
            elif r["kind"] == "uniform" and name.removeprefix("all-") in uniform_ms:
                pol.at[i, "latency_ms"] = uniform_ms[name.removeprefix("all-")]
        replace_table(run, "policies", pol)
