"""``sweep_to_run``: from a model and a task to a Run folder (``analysis.api.analyze`` adds latency).

The Run is created (as ``partial``) as soon as the inputs are checked and the static
tables (layers, histograms, clipping, cost) are known; each finished chunk of jobs is
persisted at once and the sensitivity table refreshed, so a Run opened mid-sweep shows
what is done, and ``resume=True`` after any interruption finishes without recomputing.

Example:
    >>> from analysis.engine.analyze import sweep_to_run
    >>> run = sweep_to_run("demo:digits", "digits", "runs/digits")
    >>> run.sensitivity.sort_values("kl").tail(3)
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.quant.sizes import cost_table, policy_bytes
from analysis.engine.executors import (CHUNKS_PER_WORKER, EXECUTORS, MIN_CHUNKS, WorkerSpec, act_quant_rows, balanced_chunks, chunked,
                                open_pool)
from analysis.quant.formats import FP32, get_format, with_group_size, with_observer
from analysis.engine.jobstore import JobStore
from analysis.models.loading import load_model
from analysis.store.run import (SWEEP_POLICY_KINDS, RunError, clean_leftovers, load_run, merge_policy_rows, replace_table,
                          update_meta, write_run)
from analysis.engine.stats import calibrate, statistics_tables, weight_sqnr
from analysis.engine.sweep import SweepRunner, job_key, plan_jobs
from analysis.engine.tables import finite_or_none, layers_table, policies_table, sensitivity_table
from analysis.data.tasks import load_task
from analysis.errors import InputError

VERSION = "0.1.0"
SERIAL_CHUNK = 8  # jobs per chunk in this process: what an interruption can lose


class AnalysisError(InputError):
    """Bad input to ``analyze``; the message names the file or field."""


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


def _formats(formats, observer: str, group_size: int | None):
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


def random_mixed_policies(layers, fmts, skip: dict, k: int, seed: int, exclude=()) -> list[dict[str, str]]:
    """Up to ``k`` distinct policies (none in ``exclude``) drawing each layer's format uniformly from
    fp32 and the formats it can take; small models may have fewer distinct mixes than ``k``."""
    rng = np.random.default_rng([seed, 7919])
    out, seen = [], set(exclude)
    for _ in range(k * 20):
        if len(out) == k:
            break
        pol = {}
        for l in layers:
            options = ["fp32"] + [f.name for f in fmts if (l.name, f.name) not in skip]
            choice = options[int(rng.integers(len(options)))]
            if choice != "fp32":
                pol[l.name] = choice
        key = tuple(sorted(pol.items()))
        if key not in seen and 0 < len(pol):
            seen.add(key)
            out.append(pol)
    return out


def _resume_check(out: Path, context_key: str) -> None:
    try:
        previous = load_run(out)
    except RunError as e:
        raise AnalysisError(f"--resume: {e}") from None
    if previous.meta.get("sweep", {}).get("context_key") != context_key:
        raise AnalysisError(f"--resume: {out}/run.json was made with another model, data or settings "
                            f"(field 'sweep.context_key' differs); start a new Run instead")


def sweep_to_run(model: str, task: str = "digits", out: str | Path = "runs/run", *, formats=("int8", "int4"),
            calib: int | None = None, seed: int = 0, observer: str = "minmax", group_size: int | None = None,
            metric: str | None = None, weights: str | None = None, incremental: bool = True,
            overwrite: bool = False, threads: int | None = None, progress: bool = True,
            executor: str = "serial", workers: int = 2, ray_address: str | None = None,
            resume: bool = False, chunk_size: int | None = None, random_policies: int = 8) -> "Run":
    """Measure every quantizable layer of ``model`` under each format on ``task``; write a Run.

    Args:
        model: ``demo:digits``, ``package.module:factory`` or an ``.onnx`` file.
        task: a bundled task name (``digits``) or an ``.npz`` with ``inputs`` [and ``labels``].
        out: the Run folder to create (must be absent or empty unless ``overwrite`` or ``resume``).
        formats: registered format names to sweep (fp32 is always the reference).
        calib: number of calibration samples; observer: minmax | percentile | mse.
        incremental: recompute only downstream of each perturbed layer when the model traces.
        executor: serial | process | ray; workers: processes or Ray actors (each loads the model once).
        resume: finish an interrupted Run at ``out`` without recomputing finished jobs.
        random_policies: K random mixed policies measured whole, to calibrate and validate projections.
        chunk_size: most jobs per chunk, the unit of work and of persistence (default: 8 when serial;
            pools cut chunks of balanced cost: at least ``MIN_CHUNKS``, ``CHUNKS_PER_WORKER`` per worker).

    Returns:
        The Run as written (same as ``load_run(out)``).
    """
    out = Path(out)
    if executor not in EXECUTORS:
        raise AnalysisError(f"--executor: unknown executor '{executor}'; known: {', '.join(EXECUTORS)}")
    if workers < 1:
        raise AnalysisError(f"--workers {workers}: must be at least 1")
    if chunk_size is not None and chunk_size < 1:
        raise AnalysisError(f"--chunk-size {chunk_size}: must be at least 1")
    if resume:
        if not (out / "run.json").is_file():
            raise AnalysisError(f"--resume: {out} holds no Run to resume")
    else:
        _check_out(out, overwrite)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    fmts = _formats(formats, observer, group_size)
    t = load_task(task, metric=metric, calib=calib, seed=seed)
    example = torch.from_numpy(t.eval_inputs[:2])
    tm = load_model(model, example, weights=weights, source_hint=t.source)
    for f in fmts:
        tm.formats[f.name] = f
    with torch.no_grad():
        y = tm.run(example)
    m = t.resolve_metric(tuple(y.shape))
    plan = _plan(tm, t, m.name, fmts, incremental=incremental, random_policies=random_policies, seed=seed)
    if resume:
        _resume_check(out, plan.context_key)

    t0 = time.perf_counter()
    runner = SweepRunner(tm, t, m.name, incremental=incremental)
    store = JobStore(out / "jobs")
    done: dict[str, dict] = {}
    if resume:
        clean_leftovers(out)  # temporary files of the interrupted writer
        store.clean_temporaries()
        done.update(store.load({j.key for j in plan.jobs}))
    todo = [j for j in plan.jobs if j.key not in done]
    n_batches = math.ceil(len(t.eval_inputs) / t.batch_size)
    bar = pool = None
    if todo:
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(plan.jobs) * n_batches, initial=(len(plan.jobs) - len(todo)) * n_batches,
                       desc="sweep", unit="job-batch", file=sys.stderr, leave=False)
        spec = lambda: WorkerSpec(  # noqa: E731 - built only for pool executors
            model=model, weights=weights, task=task, task_metric=metric, calib=calib, seed=seed, metric_name=m.name,
            model_sha256=tm.sha256, formats=[f.to_dict() for f in fmts], incremental=runner.recompute is not None,
            threads=threads or 1)
        # Workers start loading now and take the weight-only jobs while this process calibrates.
        pool = open_pool(executor, runner, spec, workers=workers, ray_address=ray_address,
                         progress=bar.update if bar is not None and executor == "serial" else None)
    created_here = not resume
    try:
        if executor == "serial":
            cut = lambda js: chunked(js, chunk_size or SERIAL_CHUNK)  # noqa: E731
        else:  # balanced chunks, dearest jobs first, so no worker is left with a long last chunk
            budget = 1.0 + sum(runner.job_cost(j) for j in todo) / max(MIN_CHUNKS, workers * CHUNKS_PER_WORKER)
            cut = lambda js: balanced_chunks(js, runner.job_cost, budget, chunk_size or len(js))  # noqa: E731
        uses_ranges = {f.name for f in fmts if f.activation is not None}
        needs = {j.key for j in todo if j.format in uses_ranges or any(fn in uses_ranges for _, fn in j.policy or ())}
        later = [j for j in todo if j.key in needs]
        if pool is not None:
            for chunk in cut([j for j in todo if j.key not in needs]):
                pool.submit(chunk, [])
        stats = tm.activation_stats(t.calib_batches)
        calibrate(tm, stats, fmts)
        if pool is not None:
            ranges = act_quant_rows(tm)
            for chunk in cut(later):
                pool.submit(chunk, ranges)

        layers, skip = plan.layers, plan.skip
        wsqnr = {(l.name, f.name): weight_sqnr(tm.weight(l.name), tm.fake_weight(l.name, f)) if f.weight else math.inf
                 for l in layers for f in fmts if (l.name, f.name) not in skip}
        histograms, clipping = statistics_tables(tm, stats, fmts)
        cost = cost_table(layers, [FP32, *fmts], skip)
        other = tm.other_bytes()
        measured_on = f"{tm.kind} fake-quant, {len(t.eval_inputs)} eval samples"
        baseline, reaches, path, path_reason = runner.baseline(), runner.reaches_output(), runner.path, runner.path_reason

        def tables() -> dict[str, pd.DataFrame]:
            by_layer = {(j.layer, j.format): done[j.key] for j in plan.jobs if j.is_layer and j.key in done}
            by_policy = {j.policy_name: done[j.key] for j in plan.jobs if not j.is_layer and j.key in done}
            return {"layers": layers_table(layers, reaches),
                    "sensitivity": sensitivity_table(layers, [f.name for f in fmts], skip, by_layer, baseline, wsqnr),
                    "histograms": histograms, "clipping": clipping, "cost": cost,
                    "policies": policies_table(baseline, by_policy, plan.policies, cost, other, measured_on, plan.kinds)}

        fp32_bytes = policy_bytes(cost, {}, other)
        meta = {
            "status": "partial",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": tm.name, "kind": tm.kind, "source": tm.source, "sha256": tm.sha256, "params": tm.params(),
                      "fp32_bytes": fp32_bytes, "other_bytes": other, "n_layers": len(layers),
                      "weights": str(weights) if weights else None},
            "data": {"task": t.name, "spec": task, "source": t.source, "sha256": t.sha256,
                     "n_calib": int(len(t.calib_inputs)), "n_eval": int(len(t.eval_inputs)),
                     "input_shape": list(t.eval_inputs.shape[1:]), "labels": t.eval_labels is not None,
                     "calib_arg": calib, "metric_arg": metric},
            "metric": {"name": m.name, "higher_is_better": m.higher_is_better, "loss": m.loss, "description": m.description},
            "formats": [f.name for f in fmts],
            "format_specs": {f.name: f.to_dict() for f in [FP32, *fmts]},
            "observer": observer,
            "baseline": {"metric": baseline["metric"], "loss": baseline["loss"], "bytes": fp32_bytes},
            "uniform": {},
            "sweep": {"path": path, "path_reason": path_reason, "jobs": len(plan.jobs), "skipped": len(skip),
                      "executor": executor, "workers": workers if executor != "serial" else 1, "chunk_size": chunk_size,
                      "incremental_requested": incremental, "context_key": plan.context_key},
            "progress": {"done": 0, "total": len(plan.jobs)},
            "versions": versions(),
            "seed": seed,
            "cpu": cpu_info(),
        }
        if resume:
            run = load_run(out)
        else:
            run = write_run(out, meta, tables(), overwrite=overwrite)
        run.meta.update({k: v for k, v in meta.items() if k not in ("created",)})

        if pool is not None:
            for records in pool.results():
                for r in records:
                    store.save(r)
                    done[r["key"]] = r
                if bar is not None and executor != "serial":
                    bar.update(len(records) * n_batches)
                t_ = tables()
                replace_table(run, "sensitivity", t_["sensitivity"])
                merge_policy_rows(run, t_["policies"], owned_kinds=SWEEP_POLICY_KINDS)
                update_meta(run, progress={"done": len(done), "total": len(plan.jobs)})
        final = tables()
        uniform_meta = {}
        pol = final["policies"].set_index("name")
        for f in fmts:
            row = pol.loc[f"all-{f.name}"]
            rec = done[next(j.key for j in plan.jobs if j.policy_name == f"all-{f.name}")]["result"]
            uniform_meta[f.name] = {"metric": float(row["metric"]), "loss": float(row["loss"]),
                                    "kl": finite_or_none(rec.get("kl")), "bytes": int(row["bytes"]),
                                    "skipped_layers": sorted(l for (l, fn) in skip if fn == f.name)}
        sweep_meta = {**meta["sweep"], "seconds": round(time.perf_counter() - t0, 3), "resumed": resume}
        replace_table(run, "sensitivity", final["sensitivity"])
        merge_policy_rows(run, final["policies"], owned_kinds=SWEEP_POLICY_KINDS)
        update_meta(run, status="complete", uniform=uniform_meta, sweep=sweep_meta,
                    progress={"done": len(done), "total": len(plan.jobs)})
    except KeyboardInterrupt:
        raise
    except ValueError:
        if created_here and not done:
            shutil.rmtree(out, ignore_errors=True)  # bad input found mid-way: leave nothing half-written
        raise
    finally:
        if pool is not None:
            pool.close()
        if bar is not None:
            bar.close()
    return load_run(out)


@dataclass
class SweepPlan:
    """What a sweep will measure, and the content address of its settings."""

    layers: list
    skip: dict[tuple[str, str], str]
    layer_jobs: list[tuple[str, str]]
    policies: dict[str, dict[str, str]]
    kinds: dict[str, str]
    context_key: str
    jobs: list


def _plan(tm, t, metric_name: str, fmts, *, incremental: bool, random_policies: int, seed: int) -> SweepPlan:
    """Every layer x format a layer can take, the uniform policies and K random mixes, as keyed jobs."""
    layers = tm.layers()
    skip = {(l.name, f.name): r for l in layers for f in fmts if (r := tm.skip_reason(l.name, f))}
    layer_jobs = [(l.name, f.name) for l in layers for f in fmts if (l.name, f.name) not in skip]
    policies = {f"all-{f.name}": {l.name: f.name for l in layers if (l.name, f.name) not in skip} for f in fmts}
    kinds = {name: "uniform" for name in policies}
    uniform_keys = [tuple(sorted(p.items())) for p in policies.values()]
    for i, pol in enumerate(random_mixed_policies(layers, fmts, skip, random_policies, seed, uniform_keys), start=1):
        policies[f"random-{i}"] = pol
        kinds[f"random-{i}"] = "random"
    context = {"model": tm.sha256, "data": t.sha256, "formats": [f.to_dict() for f in fmts], "metric": metric_name,
               "n_calib": len(t.calib_inputs), "batch_size": t.batch_size, "incremental": incremental,
               "random_policies": random_policies, "seed": seed}
    return SweepPlan(layers, skip, layer_jobs, policies, kinds, job_key(context), plan_jobs(context, layer_jobs, policies))
