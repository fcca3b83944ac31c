"""The sensitivity sweep: every layer x format alone, plus whole-model policies.

Jobs are units with content-addressed keys. A chunk of jobs runs batch-outer, job-inner:
per evaluation batch the FP32 forward runs once and keeps its intermediate values (one
batch of them), then each single-layer job recomputes only what lies downstream of its
layer. Whole-model policies run a full forward. A chunk returns one plain record per
job, which the caller persists at once (see ``analysis.jobstore``).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import torch

from analysis.models.torch_graph import TracedGraph
from analysis.models.torch_model import TorchModel
from analysis.tasks import MetricState, Task

INCREMENTAL = "fx-incremental"
FULL_FORWARD = "full-forward"
SWEEP_CODE_VERSION = "sweep/1"  # bump when a job's numbers would change for the same inputs


class SweepError(ValueError):
    """The model cannot be swept on this task (bad output, non-finite FP32 values)."""


@dataclass(frozen=True)
class Job:
    """One unit of work: a layer alone at a format, or a whole-model policy."""

    key: str
    layer: str | None = None
    format: str | None = None
    policy_name: str | None = None
    policy: tuple[tuple[str, str], ...] | None = None

    @property
    def is_layer(self) -> bool:
        return self.layer is not None

    def to_dict(self) -> dict:
        return {"key": self.key, "layer": self.layer, "format": self.format, "policy_name": self.policy_name,
                "policy": dict(self.policy) if self.policy is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        pol = tuple(sorted(d["policy"].items())) if d.get("policy") is not None else None
        return cls(d["key"], d.get("layer"), d.get("format"), d.get("policy_name"), pol)


def job_key(context: dict, **what) -> str:
    """Content address of a job: model, data, formats and settings (``context``), the job itself, code version."""
    blob = json.dumps({"context": context, "job": what, "code": SWEEP_CODE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def plan_jobs(context: dict, layer_jobs: list[tuple[str, str]], policies: dict[str, dict[str, str]]) -> list[Job]:
    jobs = [Job(job_key(context, layer=l, format=f), layer=l, format=f) for l, f in layer_jobs]
    for name, pol in policies.items():
        items = tuple(sorted(pol.items()))
        jobs.append(Job(job_key(context, policy=items), policy_name=name, policy=items))
    return jobs


@dataclass
class _Acc:
    state: MetricState
    signal: float = 0.0  # summed squares of the layer's FP32 output
    noise: float = 0.0  # summed squares of (quantized - FP32) layer output
    seconds: float = 0.0
    nonfinite: int = 0  # samples whose output holds NaN or Inf (e.g. an exp that overflows once quantized)


def _nonfinite_samples(y: torch.Tensor) -> int:
    return int((~torch.isfinite(y.reshape(y.shape[0], -1))).any(1).sum())


def _as_tensor(y, where: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise SweepError(f"{where}: the model must return one tensor, got {type(y).__name__}")
    return y


def trace_model(model: TorchModel, probe: str | None, x: torch.Tensor) -> tuple[TracedGraph | None, str]:
    """A traced graph that reproduces the model on ``x`` and, when layer ``probe`` is given, whose
    incremental recomputation matches a full forward after that layer's weight is perturbed;
    or None and why. Two samples are enough to catch what tracing can get wrong."""
    names = [info.name for info in model.layers()]
    x = x[:2]
    with model.no_inplace(), torch.no_grad():
        try:
            graph = TracedGraph(model.module, names)
        except Exception as e:  # fx raises many types for untraceable code
            return None, f"torch.fx could not trace the model ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        env = graph.forward_all(x)
        y_graph = env[graph.index[graph.output_node]]
        if not isinstance(y_graph, torch.Tensor) or not torch.equal(y_graph, model.module(x)):
            return None, "the traced graph does not reproduce the model's output"
        if probe is not None:
            w = model.modules[probe].weight
            saved = w.data
            w.data = saved + 0.05 * saved.abs().mean() * torch.sign(saved)  # any change will do
            try:
                y_inc, _ = graph.rerun_from(env, probe, x)
                y_full = model.module(x)
            finally:
                w.data = saved
            if not torch.allclose(y_inc, y_full, rtol=1e-5, atol=1e-6):
                return None, "incremental recomputation did not match a full forward (in-place operations?)"
    return graph, "traced"


def reaches_output_by_probe(model: TorchModel, x: torch.Tensor) -> dict[str, bool]:
    """Untraceable models: a layer reaches the output if NaN in its output shows up there."""
    out = {}
    for info in model.layers():
        h = model.modules[info.name].register_forward_hook(lambda m, i, o: torch.full_like(o, float("nan")))
        try:
            with torch.no_grad():
                out[info.name] = bool(torch.isnan(_as_tensor(model.module(x[:2]), "model output")).any())
        except Exception:  # NaN can derail data-dependent code; then assume it reaches
            out[info.name] = True
        finally:
            h.remove()
    return out


class SweepRunner:
    """Runs chunks of jobs on one loaded model; lives in the main process or in a worker."""

    def __init__(self, model: TorchModel, task: Task, metric_name: str, *, incremental: bool = True,
                 probe: str | None = None) -> None:
        self.model, self.task, self.metric_name = model, task, metric_name
        self.names = [info.name for info in model.layers()]
        first_x = next(task.eval_batches())[0]
        self.graph, self.path_reason = (None, "incremental recomputation turned off")
        if incremental:
            self.graph, self.path_reason = trace_model(model, probe, first_x)
        self.path = INCREMENTAL if self.graph is not None else FULL_FORWARD
        self._first_x = first_x

    def job_cost(self, job: Job) -> float:
        """Share of a full forward that ``job`` recomputes per batch (whole policies, and every job on
        the full-forward path: 1); schedulers use it to balance chunks."""
        if job.is_layer and self.graph is not None:
            return len(self.graph.downstream[job.layer]) / len(self.graph.nodes)
        return 1.0

    def reaches_output(self) -> dict[str, bool]:
        if self.graph is not None:
            return {n: self.graph.reaches_output(n) for n in self.names}
        return reaches_output_by_probe(self.model, self._first_x)

    def baseline(self) -> dict[str, float]:
        """FP32 metric and loss on the evaluation data."""
        state = MetricState(self.metric_name)
        with torch.no_grad():
            for x, labels in self.task.eval_batches():
                y = _as_tensor(self.model.module(x), "model output")
                if not torch.isfinite(y).all():
                    raise SweepError("the FP32 model produced NaN or Inf on the evaluation data")
                state.update(y, y, labels)
        return state.result()

    def _fp32(self, x: torch.Tensor, layers: set[str]):
        """FP32 output of a batch plus what jobs reuse: the graph's values, or hooked layer outputs."""
        if self.graph is not None:
            env = self.graph.forward_all(x)
            return env[self.graph.index[self.graph.output_node]], env, {}
        outs: dict[str, torch.Tensor] = {}
        hooks = [self.model.modules[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in layers]
        try:
            y = self.model.module(x)
        finally:
            for h in hooks:
                h.remove()
        return y, None, outs

    def _layer_job(self, job: Job, x, env, ref_outputs):
        with self.model.quantized({job.layer: job.format}):
            if self.graph is not None:
                y, out = self.graph.rerun_from(env, job.layer, x)
                return y, out, self.graph.layer_output(env, job.layer)
            got = {}
            h = self.model.modules[job.layer].register_forward_hook(lambda m, i, o: got.__setitem__("o", o))
            try:
                y = self.model.module(x)
            finally:
                h.remove()
            return y, got["o"], ref_outputs[job.layer]

    def run(self, jobs: list[Job], progress=None) -> list[dict]:
        """Measure ``jobs`` on the whole evaluation set; one record per job, in order."""
        accs = {job.key: _Acc(MetricState(self.metric_name)) for job in jobs}
        layers = {j.layer for j in jobs if j.is_layer}
        with torch.no_grad(), self.model.no_inplace():
            for x, labels in self.task.eval_batches():
                y_ref, env, ref_outputs = self._fp32(x, layers)
                y_ref = _as_tensor(y_ref, "model output")
                if not torch.isfinite(y_ref).all():
                    raise SweepError("the FP32 model produced NaN or Inf on the evaluation data")
                for job in jobs:
                    t0, acc = time.perf_counter(), accs[job.key]
                    if job.is_layer:
                        y, out, ref = self._layer_job(job, x, env, ref_outputs)
                        acc.signal += float((ref.double() ** 2).sum())
                        acc.noise += float(((out.double() - ref.double()) ** 2).sum())
                    else:
                        with self.model.quantized(dict(job.policy)):
                            y = self.model.module(x)
                    acc.state.update(_as_tensor(y, "model output"), y_ref, labels)
                    acc.nonfinite += _nonfinite_samples(y)
                    acc.seconds += time.perf_counter() - t0
                    if progress:
                        progress(1)
        return [{**job.to_dict(), "result": accs[job.key].state.result(), "signal": accs[job.key].signal,
                 "noise": accs[job.key].noise, "seconds": round(accs[job.key].seconds, 4), "path": self.path,
                 "nonfinite": accs[job.key].nonfinite}
                for job in jobs]


@dataclass
class Measured:
    """A finished measurement; reads like a ``MetricState`` (``result()``)."""

    values: dict

    def result(self) -> dict:
        return dict(self.values)


@dataclass
class JobResult:
    state: MetricState | Measured
    signal: float = 0.0  # summed squares of the layer's FP32 output
    noise: float = 0.0  # summed squares of (quantized - FP32) layer output


@dataclass
class SweepResult:
    """A whole sweep in one process: what a backend's ``sweep()`` returns."""

    path: str
    path_reason: str
    baseline: MetricState | Measured
    jobs: dict[tuple[str, str], JobResult]
    policies: dict[str, MetricState | Measured]
    reaches_output: dict[str, bool]
    seconds: float = 0.0
    batches: int = 0
    extra: dict = field(default_factory=dict)


def run_sweep(model: TorchModel, task: Task, metric_name: str, jobs: list[tuple[str, str]],
              policies: dict[str, dict[str, str]], *, incremental: bool = True, progress=None) -> SweepResult:
    """All ``jobs`` (layer, format) and ``policies`` in this process, in one chunk."""
    t0 = time.perf_counter()
    runner = SweepRunner(model, task, metric_name, incremental=incremental, probe=jobs[len(jobs) // 2][0] if jobs else None)
    records = runner.run(plan_jobs({}, jobs, policies), progress)
    by_layer = {(r["layer"], r["format"]): JobResult(Measured(r["result"]), r["signal"], r["noise"])
                for r in records if r["layer"] is not None}
    by_policy = {r["policy_name"]: Measured(r["result"]) for r in records if r["layer"] is None}
    n_batches = -(-len(task.eval_inputs) // task.batch_size)
    return SweepResult(runner.path, runner.path_reason, Measured(runner.baseline()), by_layer, by_policy,
                       runner.reaches_output(), seconds=time.perf_counter() - t0, batches=n_batches)
