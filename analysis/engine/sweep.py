"""The sensitivity sweep: every layer x format alone, plus whole-model policies.

Jobs are units with content-addressed keys. A chunk of jobs runs batch-outer, job-inner:
per evaluation batch the FP32 forward runs once and keeps its intermediate values (one
batch of them), then each single-layer job recomputes only what lies downstream of its
layer. Whole-model policies run a full forward. A chunk returns one plain record per
job, which the caller persists at once (see ``analysis.engine.jobstore``).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import torch

from analysis.data.tasks import MetricState, Task
from analysis.errors import InputError
from analysis.models.base import ModelAdapter

INCREMENTAL = "fx-incremental"
FULL_FORWARD = "full-forward"
SWEEP_CODE_VERSION = "sweep/2"  # bump when a job's numbers would change for the same inputs (2: outputs requantized)


class SweepError(InputError):
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


class SweepRunner:
    """Runs chunks of jobs on one loaded model through the adapter protocol (``models.base.ModelAdapter``);
    lives in the main process or in a worker. Adapters that can recompute downstream of a layer
    (``incremental``) get single-layer jobs that reuse the batch's FP32 values."""

    def __init__(self, model: ModelAdapter, task: Task, metric_name: str, *, incremental: bool = True) -> None:
        self.model, self.task, self.metric_name = model, task, metric_name
        self.names = [info.name for info in model.layers()]
        first_x = next(task.eval_batches())[0]
        self.recompute, self.path_reason = None, "incremental recomputation turned off"
        if incremental:
            if hasattr(model, "incremental"):
                self.recompute, self.path_reason = model.incremental(first_x)
            else:
                self.path_reason = f"{model.kind} models run whole graphs: every job is a full forward"
        self.path = INCREMENTAL if self.recompute is not None else FULL_FORWARD
        self._first_x = first_x
        self._carried: dict[int, object] = {}  # evaluation batch -> where its next chunk resumes (incremental)
        self._signal: dict[str, float] = {}  # layer -> summed squares of its FP32 output, on the current batch

    def job_cost(self, job: Job) -> float:
        """Share of a full forward that ``job`` recomputes per batch (whole policies, and every job on
        the full-forward path: 1); schedulers use it to balance chunks."""
        if job.is_layer and self.recompute is not None:
            return self.recompute.cost(job.layer)
        return 1.0

    def reaches_output(self) -> dict[str, bool]:
        if self.recompute is not None:
            return self.recompute.reaches_output()
        return self.model.reaches_output(self._first_x)

    def baseline(self) -> dict[str, float]:
        """FP32 metric and loss on the evaluation data."""
        state = MetricState(self.metric_name)
        with self.model.evaluating():
            for x, labels in self.task.eval_batches():
                y = _finite_reference(self.model.forward(x)[0])
                state.update(y, y, labels)
        return state.result()

    def run(self, jobs: list[Job], progress=None) -> list[dict]:
        """Measure ``jobs`` on the whole evaluation set; one record per job, in order.

        On the incremental path layer jobs run in graph order, so the batch's FP32 forward only moves
        forward and drops what no pending job reads; what the next chunk on a batch resumes from is kept
        (``carried``). Fake-quantized weights are made once per chunk and dropped after it."""
        accs = {job.key: _Acc(MetricState(self.metric_name)) for job in jobs}
        model, recompute = self.model, self.recompute
        layer_jobs = [j for j in jobs if j.is_layer]
        if recompute is not None:
            layer_jobs.sort(key=lambda j: recompute.order(j.layer))
        order = layer_jobs + [j for j in jobs if not j.is_layer]
        layers = sorted({j.layer for j in layer_jobs})
        try:
            with model.evaluating():
                for b, (x, labels) in enumerate(self.task.eval_batches()):
                    self._signal = {}
                    if recompute is not None:
                        cache = recompute.start(x, [j.layer for j in layer_jobs], self._carried.get(b))
                        y_ref = recompute.output(cache)
                    else:
                        y_ref, ref_outputs = model.forward(x, capture=layers)
                    y_ref = _finite_reference(y_ref)
                    for job in order:
                        self._measure(job, accs[job.key], x, labels, y_ref, cache if recompute is not None else None,
                                      None if recompute is not None else ref_outputs)
                        if progress:
                            progress(1)
                    if recompute is not None:
                        self._carried[b] = recompute.carry(cache)
                        del cache
        finally:
            getattr(model, "release_fake_weights", lambda: None)()
        return [{**job.to_dict(), "result": accs[job.key].state.result(), "signal": accs[job.key].signal,
                 "noise": accs[job.key].noise, "seconds": round(accs[job.key].seconds, 4), "path": self.path,
                 "nonfinite": accs[job.key].nonfinite}
                for job in jobs]

    def _measure(self, job: Job, acc: _Acc, x, labels, y_ref, cache, ref_outputs) -> None:
        """One job on one batch, added to its accumulator."""
        model = self.model
        t0 = time.perf_counter()
        if job.is_layer:
            if cache is not None:
                y, out, ref = self.recompute.rerun(cache, job.layer, job.format, x)
            else:
                with model.quantized({job.layer: job.format}):
                    y, outs = model.forward(x, capture=[job.layer])
                out, ref = outs[job.layer], ref_outputs[job.layer]
            if job.layer not in self._signal:  # the FP32 output's power: the same for every format of a layer
                self._signal[job.layer] = float((ref.double() ** 2).sum())
            acc.signal += self._signal[job.layer]
            acc.noise += float(((out.double() - ref.double()) ** 2).sum())
        else:
            with model.quantized(dict(job.policy)):
                y = model.forward(x)[0]
        acc.state.update(_as_tensor(y, "model output"), y_ref, labels)
        acc.nonfinite += _nonfinite_samples(y)
        acc.seconds += time.perf_counter() - t0


def _finite_reference(y) -> torch.Tensor:
    y = _as_tensor(y, "model output")
    if not torch.isfinite(y).all():
        raise SweepError("the FP32 model produced NaN or Inf on the evaluation data")
    return y


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


def run_sweep(model: ModelAdapter, task: Task, metric_name: str, jobs: list[tuple[str, str]],
              policies: dict[str, dict[str, str]], *, incremental: bool = True, progress=None) -> SweepResult:
    """All ``jobs`` (layer, format) and ``policies`` in this process, in one chunk."""
    t0 = time.perf_counter()
    runner = SweepRunner(model, task, metric_name, incremental=incremental)
    records = runner.run(plan_jobs({}, jobs, policies), progress)
    by_layer = {(r["layer"], r["format"]): JobResult(Measured(r["result"]), r["signal"], r["noise"])
                for r in records if r["layer"] is not None}
    by_policy = {r["policy_name"]: Measured(r["result"]) for r in records if r["layer"] is None}
    n_batches = -(-len(task.eval_inputs) // task.batch_size)
    return SweepResult(runner.path, runner.path_reason, Measured(runner.baseline()), by_layer, by_policy,
                       runner.reaches_output(), seconds=time.perf_counter() - t0, batches=n_batches)
