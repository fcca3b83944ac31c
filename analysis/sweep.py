"""The sensitivity sweep: every layer x format alone, plus whole-model policies.

The loop is batch-outer, job-inner: per evaluation batch the FP32 forward runs once and
keeps its intermediate values (one batch of them), then each single-layer job recomputes
only what lies downstream of its layer. Whole-model policies run a full forward.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from analysis.models.torch_graph import TracedGraph
from analysis.models.torch_model import TorchModel
from analysis.tasks import MetricState, Task

INCREMENTAL = "fx-incremental"
FULL_FORWARD = "full-forward"


class SweepError(ValueError):
    """The model cannot be swept on this task (bad output, non-finite FP32 values)."""


@dataclass
class JobResult:
    state: MetricState
    signal: float = 0.0  # summed squares of the layer's FP32 output
    noise: float = 0.0  # summed squares of (quantized - FP32) layer output


@dataclass
class SweepResult:
    path: str
    path_reason: str
    baseline: MetricState
    jobs: dict[tuple[str, str], JobResult]
    policies: dict[str, MetricState]
    reaches_output: dict[str, bool]
    seconds: float = 0.0
    batches: int = 0
    extra: dict = field(default_factory=dict)


def _as_tensor(y, where: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise SweepError(f"{where}: the model must return one tensor, got {type(y).__name__}")
    return y


def _trace(model: TorchModel, names: list[str], jobs: list[tuple[str, str]], x: torch.Tensor) -> tuple[TracedGraph | None, str]:
    """A traced graph that reproduces the model on ``x``, or None with the reason."""
    try:
        graph = TracedGraph(model.module, names)
    except Exception as e:  # fx raises many types for untraceable code
        return None, f"torch.fx could not trace the model ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    with torch.no_grad():
        env = graph.forward_all(x)
        y_graph = env[graph.index[graph.output_node]]
        y_ref = model.module(x)
        if not isinstance(y_graph, torch.Tensor) or not torch.equal(y_graph, y_ref):
            return None, "the traced graph does not reproduce the model's output"
        if jobs:
            probe_layer, probe_fmt = jobs[len(jobs) // 2]
            with model.quantized({probe_layer: probe_fmt}):
                y_inc, _ = graph.rerun_from(env, probe_layer, x)
                y_full = model.module(x)
            if not torch.allclose(y_inc, y_full, rtol=1e-5, atol=1e-6):
                return None, "incremental recomputation did not match a full forward (in-place operations?)"
    return graph, "traced"


def _reaches_output_by_probe(model: TorchModel, names: list[str], x: torch.Tensor) -> dict[str, bool]:
    """Untraceable models: a layer reaches the output if NaN in its output shows up there."""
    out = {}
    for name in names:
        h = model.modules[name].register_forward_hook(lambda m, i, o: torch.full_like(o, float("nan")))
        try:
            with torch.no_grad():
                out[name] = bool(torch.isnan(_as_tensor(model.module(x[:2]), "model output")).any())
        except Exception:  # NaN can derail data-dependent code; then assume it reaches
            out[name] = True
        finally:
            h.remove()
    return out


def run_sweep(model: TorchModel, task: Task, metric_name: str, jobs: list[tuple[str, str]],
              policies: dict[str, dict[str, str]], *, incremental: bool = True, progress=None) -> SweepResult:
    """Measure ``jobs`` (layer, format) and whole-model ``policies`` on the evaluation data.

    Args:
        progress: optional callable ``(n_done_units)`` advanced once per job per batch.
    """
    names = [info.name for info in model.layers()]
    first_x = next(task.eval_batches())[0]
    graph, reason = (None, "incremental recomputation turned off")
    if incremental:
        with model.no_inplace():
            graph, reason = _trace(model, names, jobs, first_x)
    path = INCREMENTAL if graph is not None else FULL_FORWARD
    reaches = {n: graph.reaches_output(n) for n in names} if graph else _reaches_output_by_probe(model, names, first_x)

    baseline = MetricState(metric_name)
    results = {job: JobResult(MetricState(metric_name)) for job in jobs}
    pol_states = {name: MetricState(metric_name) for name in policies}
    t0, n_batches = time.perf_counter(), 0
    with torch.no_grad(), model.no_inplace():
        for x, labels in task.eval_batches():
            n_batches += 1
            ref_outputs: dict[str, torch.Tensor] = {}
            if graph is not None:
                env = graph.forward_all(x)
                y_ref = env[graph.index[graph.output_node]]
            else:
                hooks = [model.modules[n].register_forward_hook(lambda m, i, o, n=n: ref_outputs.__setitem__(n, o))
                         for n in names]
                try:
                    y_ref = model.module(x)
                finally:
                    for h in hooks:
                        h.remove()
            y_ref = _as_tensor(y_ref, "model output")
            if not torch.isfinite(y_ref).all():
                raise SweepError("the FP32 model produced NaN or Inf on the evaluation data")
            baseline.update(y_ref, y_ref, labels)
            for (layer, fmt) in jobs:
                with model.quantized({layer: fmt}):
                    if graph is not None:
                        y, out = graph.rerun_from(env, layer, x)
                        ref = graph.layer_output(env, layer)
                    else:
                        got = {}
                        h = model.modules[layer].register_forward_hook(lambda m, i, o: got.__setitem__("o", o))
                        try:
                            y = model.module(x)
                        finally:
                            h.remove()
                        out, ref = got["o"], ref_outputs[layer]
                r = results[(layer, fmt)]
                r.state.update(_as_tensor(y, "model output"), y_ref, labels)
                r.signal += float((ref.double() ** 2).sum())
                r.noise += float(((out.double() - ref.double()) ** 2).sum())
                if progress:
                    progress(1)
            for name, policy in policies.items():
                with model.quantized(policy):
                    pol_states[name].update(_as_tensor(model.module(x), "model output"), y_ref, labels)
                if progress:
                    progress(1)
    return SweepResult(path, reason, baseline, results, pol_states, reaches,
                       seconds=time.perf_counter() - t0, batches=n_batches)
