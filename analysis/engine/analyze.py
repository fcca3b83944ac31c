"""``sweep_to_run``: from a model and a task to a Run folder (``analysis.api.analyze`` adds latency).

The Run is created (as ``partial``) as soon as the inputs are checked and the static
tables (layers, histograms, clipping, cost) are known; each finished chunk of jobs is
persisted at once and the sensitivity table refreshed, so a Run opened mid-sweep shows
what is done, and ``resume=True`` after any interruption finishes without recomputing.
Overwriting a Run, the new one replaces it only once its sweep has persisted its first
records (``analysis.engine.runfolder``): a new Run that fails leaves the old one as it was.

The steps, in order: check the options, load model and task, plan the jobs
(``analysis.engine.plan``), open the pool, calibrate (the pool's workers start on the jobs
that need no activation ranges meanwhile), the static tables, the Run's metadata, collect
the chunks' results as they come, finish.

Example:
    >>> from analysis.engine.analyze import sweep_to_run
    >>> run = sweep_to_run("demo:digits", "digits", "runs/digits")
    >>> run.sensitivity.sort_values("kl").tail(3)
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.data.batch import describe_shape
from analysis.data.metrics import choose_metric
from analysis.data.tasks import Metric, load_task
from analysis.engine.executors import (CHUNKS_PER_WORKER, EXECUTORS, MIN_CHUNKS, WorkerSpec, act_quant_rows,
                                       balanced_chunks, chunked, open_pool)
from analysis.engine.plan import SweepPlan, plan_sweep
from analysis.engine.runfolder import RunFolder
from analysis.engine.channels import weight_tables
from analysis.engine.stats import calibrate, statistics_tables
from analysis.engine.sweep import SweepRunner, SWEEP_CODE_VERSION
from analysis.engine.tables import RunTables, finite_or_none
from analysis.models.structure import Structure, without_dataflow
from analysis.errors import InputError
from analysis.models.loading import load_model
from analysis.quant.act import ActivationStats
from analysis.quant.formats import FP32, QuantFormat, get_format, with_group_size, with_observer
from analysis.quant.sizes import cost_table, policy_bytes
from analysis.store.run import SWEEP_POLICY_KINDS, Run, RunError, load_run, merge_policy_rows, replace_table, update_meta
from analysis.store.writer import hold_writer

VERSION = "0.1.0"
SERIAL_CHUNK = 8  # jobs per chunk in this process: what an interruption can lose


class AnalysisError(InputError):
    """Bad input to ``analyze``; the message names the file or field."""


@dataclass(frozen=True)
class SweepOptions:
    """What ``sweep_to_run`` was asked for: its arguments, documented there."""

    model: str
    task: str
    out: Path
    formats: tuple[str, ...] | list[str] | str
    calib: int | None
    seed: int
    observer: str
    group_size: int | None
    metric: str | None
    weights: str | None
    incremental: bool
    overwrite: bool
    threads: int | None
    progress: bool
    executor: str
    workers: int
    ray_address: str | None
    resume: bool
    chunk_size: int | None
    random_policies: int
    task_options: dict | None = None
    output: str | None = None


def sweep_to_run(model: str, task: str = "digits", out: str | Path = "runs/run", *, formats=("int8", "int4"),
                 calib: int | None = None, seed: int = 0, observer: str = "minmax", group_size: int | None = None,
                 metric: str | None = None, weights: str | None = None, incremental: bool = True,
                 overwrite: bool = False, threads: int | None = None, progress: bool = True,
                 executor: str = "serial", workers: int = 2, ray_address: str | None = None,
                 resume: bool = False, chunk_size: int | None = None, random_policies: int = 8,
                 task_options: dict | None = None, output: str | None = None,
                 writer: contextlib.ExitStack | None = None) -> Run:
    """Measure every quantizable layer of ``model`` under each format on ``task``; write a Run.

    Args:
        model: ``demo:digits``, ``package.module:factory`` or an ``.onnx`` file.
        task: a bundled task name (``digits``) or an ``.npz`` with ``inputs`` [and ``labels``].
        out: the Run folder to create (must be absent or empty unless ``overwrite`` or ``resume``).
        formats: registered format names to sweep (fp32 is always the reference).
        calib: number of calibration samples; observer: minmax | percentile | mse.
        incremental: recompute only downstream of each perturbed layer when the model traces.
        overwrite: replace the Run at ``out``; it stays as it was if the new sweep fails before its first records.
        executor: serial | process | ray; workers: processes or Ray actors (each loads the model once).
        resume: finish an interrupted Run at ``out`` without recomputing finished jobs.
        random_policies: K random mixed policies measured whole, to calibrate and validate projections.
        task_options: options of the task's kind (``--task-option KEY=VALUE``: text columns, image sizes, ...).
        output: the model output the metric compares when there are several (default: all of them).
        writer: keeps the Run's writer lock (``analysis.store.writer.hold_writer``) past the return, until this
            stack closes (``analysis.api.analyze`` measures latency under it); by default it goes on return.
        chunk_size: most jobs per chunk, the unit of work and of persistence (default: 8 when serial;
            pools cut chunks of balanced cost: at least ``MIN_CHUNKS``, ``CHUNKS_PER_WORKER`` per worker).

    Returns:
        The Run as written (same as ``load_run(out)``).

    Raises:
        RunBusy: another process is writing the Run at ``out``.
    """
    o = SweepOptions(model=model, task=task, out=Path(out), formats=formats, calib=calib, seed=seed, observer=observer,
                     group_size=group_size, metric=metric, weights=weights, incremental=incremental,
                     overwrite=overwrite, threads=threads, progress=progress, executor=executor, workers=workers,
                     ray_address=ray_address, resume=resume, chunk_size=chunk_size, random_policies=random_policies,
                     task_options=dict(task_options or {}), output=output)
    _check_options(o)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    fmts = _formats(formats, observer, group_size)
    tm, t, m, metric_reason = _model_and_task(o, fmts)
    plan = plan_sweep(tm, t, m.name, fmts, incremental=incremental, random_policies=random_policies, seed=seed)
    # one writer per Run: taken once the inputs are checked (bad input leaves nothing beside ``out``), before
    # anything in the Run is read or cleaned; a demo holding it already goes on under its own hold
    with contextlib.ExitStack() as held:
        (writer if writer is not None else held).enter_context(hold_writer(o.out, f"analyze {model}", join=True))
        return _sweep(o, fmts, tm, t, m, metric_reason, plan)


def _sweep(o: SweepOptions, fmts: list[QuantFormat], tm, t, m: Metric, metric_reason: str | None,
           plan: SweepPlan) -> Run:
    """``sweep_to_run`` from its checked inputs on, under the Run's writer lock."""
    resume, progress, incremental, executor = o.resume, o.progress, o.incremental, o.executor
    if resume:
        _resume_check(o.out, plan.context_key)

    t0 = time.perf_counter()
    runner = SweepRunner(tm, t, m.name, incremental=incremental)
    folder = RunFolder(o.out, resume=resume)
    done = folder.finished({j.key for j in plan.jobs}) if resume else {}
    todo = [j for j in plan.jobs if j.key not in done]
    n_batches = math.ceil(len(t.eval_inputs) / t.batch_size)
    bar = _progress_bar(len(plan.jobs), len(plan.jobs) - len(todo), n_batches) if todo and progress else None
    pool = _open_pool(o, runner, fmts, bar) if todo else None
    try:
        stats = _calibrate(o, runner, fmts, todo, pool)
        tables = _static_tables(runner, stats, fmts, plan)
        meta = _run_meta(o, runner, m, fmts, plan, tables, metric_reason)
        folder.create(meta, tables.build(done))
        if pool is not None:
            _collect(pool, folder, tables, done, bar.update if bar is not None and executor != "serial" else None,
                     n_batches)
        _finish(folder, tables, done, {**meta["sweep"], "seconds": round(time.perf_counter() - t0, 3), "resumed": resume})
    except BaseException as e:
        folder.abandon(remove_new=isinstance(e, ValueError) and not done)  # bad input found mid-way
        raise
    finally:
        if pool is not None:
            pool.close()
        if bar is not None:
            bar.close()
    return load_run(o.out)


def _check_options(o: SweepOptions) -> None:
    """Options that are wrong whatever the model: refused before anything is loaded or written."""
    if o.executor not in EXECUTORS:
        raise AnalysisError(f"--executor: unknown executor '{o.executor}'; known: {', '.join(EXECUTORS)}")
    if o.workers < 1:
        raise AnalysisError(f"--workers {o.workers}: must be at least 1")
    if o.chunk_size is not None and o.chunk_size < 1:
        raise AnalysisError(f"--chunk-size {o.chunk_size}: must be at least 1")
    if o.resume:
        if not (o.out / "run.json").is_file():
            raise AnalysisError(f"--resume: {o.out} holds no Run to resume")
    else:
        _check_out(o.out, o.overwrite)


def _model_and_task(o: SweepOptions, fmts: list[QuantFormat]):
    """The model (checked to run on the task's inputs, with this sweep's formats), the task, the metric
    the model's output takes, and why it was chosen where the automatic choice avoided a degenerate one."""
    t = load_task(o.task, metric=o.metric, calib=o.calib, seed=o.seed, model=o.model, options=o.task_options)
    tm = load_model(o.model, t.eval_inputs[:3], weights=o.weights, source_hint=t.source, output=o.output)
    for f in fmts:
        tm.formats[f.name] = f
    with torch.no_grad():
        y = tm.run(next(t.eval_batches())[0])
    m, reason = choose_metric(t.metric, t.eval_labels is not None, y, outputs=len(tm.outputs.selected))
    return tm, t, m, reason


def _progress_bar(total: int, finished: int, n_batches: int):
    """A tqdm bar on stderr counting job x evaluation batch (it starts at what a resumed Run holds)."""
    from tqdm import tqdm

    return tqdm(total=total * n_batches, initial=finished * n_batches, desc="sweep", unit="job-batch",
                file=sys.stderr, leave=False)


def _open_pool(o: SweepOptions, runner: SweepRunner, fmts: list[QuantFormat], bar):
    """A started pool for ``o.executor``: workers start loading the model now, while this process calibrates."""
    spec = lambda: WorkerSpec(  # noqa: E731 - built only for pool executors
        model=o.model, weights=o.weights, task=o.task, task_metric=o.metric, calib=o.calib, seed=o.seed,
        metric_name=runner.metric_name, model_sha256=runner.model.sha256, formats=[f.to_dict() for f in fmts],
        incremental=runner.recompute is not None, threads=o.threads or 1, task_options=o.task_options, output=o.output)
    return open_pool(o.executor, runner, spec, workers=o.workers, ray_address=o.ray_address,
                     progress=bar.update if bar is not None and o.executor == "serial" else None)


def _chunker(o: SweepOptions, runner: SweepRunner, todo: list):
    """How jobs are cut into chunks: runs of ``chunk_size`` in this process; for worker pools, balanced
    chunks, dearest jobs first, so no worker is left with a long last chunk."""
    if o.executor == "serial":
        return lambda js: chunked(js, o.chunk_size or SERIAL_CHUNK)
    budget = 1.0 + sum(runner.job_cost(j) for j in todo) / max(MIN_CHUNKS, o.workers * CHUNKS_PER_WORKER)
    return lambda js: balanced_chunks(js, runner.job_cost, budget, o.chunk_size or len(js))


def _calibrate(o: SweepOptions, runner: SweepRunner, fmts: list[QuantFormat], todo: list, pool) -> ActivationStats:
    """Activation statistics, and the calibrated ranges set on the model. A pool gets the jobs that need no
    ranges (weight-only formats) first, so its workers measure meanwhile, and the rest, with the ranges, after."""
    cut = _chunker(o, runner, todo)
    uses_ranges = {f.name for f in fmts if f.activation is not None and not f.activation.dynamic}
    needs = {j.key for j in todo if j.format in uses_ranges or any(fn in uses_ranges for _, fn in j.policy or ())}
    if pool is not None:
        for chunk in cut([j for j in todo if j.key not in needs]):
            pool.submit(chunk, [])
    stats = runner.model.activation_stats(runner.task.calib_batches)
    calibrate(runner.model, stats, fmts)
    if pool is not None:
        ranges = act_quant_rows(runner.model)
        for chunk in cut([j for j in todo if j.key in needs]):
            pool.submit(chunk, ranges)
    return stats


def _static_tables(runner: SweepRunner, stats: ActivationStats, fmts: list[QuantFormat], plan: SweepPlan) -> RunTables:
    """What the Run shows before any job finishes: layers, histograms, clipping, cost, the FP32 baseline
    (which refuses a model whose FP32 output holds NaN or Inf), the weights' SQNR per format, and per
    output channel (``analysis.engine.channels``)."""
    tm, t = runner.model, runner.task
    wsqnr, channels = weight_tables(tm, plan.layers, fmts, plan.skip)
    histograms, clipping = statistics_tables(tm, stats, fmts)
    cost = cost_table(plan.layers, [FP32, *fmts], plan.skip)
    other = tm.other_bytes()
    measured_on = f"{tm.kind} fake-quant, {len(t.eval_inputs)} eval samples"
    return RunTables(plan, [f.name for f in fmts], runner.baseline(), runner.reaches_output(), wsqnr, histograms,
                     clipping, cost, other, measured_on, channels=channels,
                     structure=model_structure(tm))


def model_structure(tm) -> Structure:
    """Which layers feed each layer, where the adapter can read its graph (``ModelAdapter.structure``)."""
    if not hasattr(tm, "structure"):
        return without_dataflow(f"the {tm.kind} adapter does not read the model's graph")
    return tm.structure()


def _run_meta(o: SweepOptions, runner: SweepRunner, m: Metric, fmts: list[QuantFormat], plan: SweepPlan,
              tables: RunTables, metric_reason: str | None = None) -> dict:
    """run.json of the new Run: provenance, settings, the baseline, and ``status: partial`` until it finishes."""
    tm, t = runner.model, runner.task
    fp32_bytes = policy_bytes(tables.cost, {}, tables.other_bytes)
    return {
        "status": "partial",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": tm.name, "kind": tm.kind, "source": tm.source, "sha256": tm.sha256, "params": tm.params(),
                  "fp32_bytes": fp32_bytes, "other_bytes": tables.other_bytes, "n_layers": len(plan.layers),
                  "weights": str(o.weights) if o.weights else None, "output_arg": o.output,
                  "outputs": tm.outputs.describe(), "notes": list(getattr(tm, "notes", [])),
                  "not_analysed": [{"layer": n, "reason": r} for n, r in getattr(tm, "not_analysed", [])]},
        "data": {"task": t.name, "spec": o.task, "source": t.source, "sha256": t.sha256,
                 "n_calib": int(len(t.calib_inputs)), "n_eval": int(len(t.eval_inputs)),
                 "input_shape": describe_shape(t.eval_inputs), "labels": t.eval_labels is not None,
                 "calib_arg": o.calib, "metric_arg": o.metric, "options": o.task_options},
        "metric": {"name": m.name, "higher_is_better": m.higher_is_better, "loss": m.loss, "description": m.description,
                   "chosen_because": metric_reason},
        "formats": [f.name for f in fmts],
        "format_specs": {f.name: f.to_dict() for f in [FP32, *fmts]},
        "observer": o.observer,
        "baseline": {"metric": tables.baseline["metric"], "loss": tables.baseline["loss"], "bytes": fp32_bytes},
        "uniform": {},
        "structure": tables.structure.to_meta() if tables.structure else without_dataflow("not recorded").to_meta(),
        "sweep": {"path": runner.path, "path_reason": runner.path_reason, "jobs": len(plan.jobs),
                  "skipped": len(plan.skip), "executor": o.executor,
                  "workers": o.workers if o.executor != "serial" else 1, "chunk_size": o.chunk_size,
                  "incremental_requested": o.incremental, "context_key": plan.context_key,
                  "code": SWEEP_CODE_VERSION},
        "progress": {"done": 0, "total": len(plan.jobs)},
        "versions": versions(),
        "seed": o.seed,
        "cpu": cpu_info(),
    }


def _collect(pool, folder: RunFolder, tables: RunTables, done: dict[str, dict], advance, n_batches: int) -> None:
    """Each chunk's records as they come: persisted at once, then the Run's sensitivity, policies and
    progress refreshed (``advance`` moves a progress bar the pool does not move itself)."""
    for records in pool.results():
        folder.save(records)
        done.update((r["key"], r) for r in records)
        if advance is not None:
            advance(len(records) * n_batches)
        now = tables.build(done)
        replace_table(folder.run, "sensitivity", now["sensitivity"])
        merge_policy_rows(folder.run, now["policies"], owned_kinds=SWEEP_POLICY_KINDS)
        update_meta(folder.run, progress={"done": len(done), "total": len(tables.plan.jobs)})


def _finish(folder: RunFolder, tables: RunTables, done: dict[str, dict], sweep_meta: dict) -> None:
    """The final tables, each uniform policy's figures in run.json, and ``status: complete``."""
    folder.commit()  # normally done by the first records already; a sweep that returned none swaps in here
    final = tables.build(done)
    uniform = _uniform_meta(final["policies"], tables, done)
    replace_table(folder.run, "sensitivity", final["sensitivity"])
    merge_policy_rows(folder.run, final["policies"], owned_kinds=SWEEP_POLICY_KINDS)
    update_meta(folder.run, status="complete", uniform=uniform, sweep=sweep_meta,
                progress={"done": len(done), "total": len(tables.plan.jobs)})


def _uniform_meta(policies: pd.DataFrame, tables: RunTables, done: dict[str, dict]) -> dict:
    """Per format: the all-FORMAT policy's metric, loss, KL and bytes, and the layers that cannot take it."""
    pol, plan = policies.set_index("name"), tables.plan
    out = {}
    for name in tables.formats:
        row = pol.loc[f"all-{name}"]
        rec = done[next(j.key for j in plan.jobs if j.policy_name == f"all-{name}")]["result"]
        out[name] = {"metric": float(row["metric"]), "loss": float(row["loss"]), "kl": finite_or_none(rec.get("kl")),
                     "bytes": int(row["bytes"]), "skipped_layers": sorted(l for (l, fn) in plan.skip if fn == name)}
    return out


def cpu_info() -> dict:
    """CPU model and the instruction-set flags that decide integer-kernel speed."""
    info = {"machine": platform.machine(), "model": "", "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "isa": []}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not info["model"]:
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["isa"] = sorted(flags & {"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
                                              "avx_vnni", "amx_int8"})
                break
    except OSError:
        info["model"] = platform.processor()
    return info


def versions() -> dict:
    import onnxruntime
    import pyarrow

    return {"quantlens": VERSION, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": np.__version__, "pandas": pd.__version__, "pyarrow": pyarrow.__version__,
            "onnxruntime": onnxruntime.__version__}


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AnalysisError(f"--out {out}: exists and is not empty (choose another folder, pass --overwrite, "
                            f"or --resume to finish an interrupted Run)")


def _formats(formats, observer: str, group_size: int | None) -> list[QuantFormat]:
    if isinstance(formats, str):
        formats = [f for f in formats.split(",") if f.strip()]
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
    return fmts


def _resume_check(out: Path, context_key: str) -> None:
    try:
        previous = load_run(out)
    except RunError as e:
        raise AnalysisError(f"--resume: {e}") from None
    if previous.meta.get("sweep", {}).get("context_key") != context_key:
        raise AnalysisError(f"--resume: {out}/run.json was made with another model, data or settings "
                            f"(field 'sweep.context_key' differs); start a new Run instead")
