"""Where sweep chunks run: this process, a local process pool, or a Ray cluster.

A pool is opened before the parent calibrates, so workers load the model (from a
plain-data ``WorkerSpec``) and start on the jobs that need no calibration (weight-only
formats) while the parent measures activation ranges; chunks that quantize activations
carry the calibrated ranges with them. Results come back as plain records, in the order
chunks finish, and the caller persists each chunk as it arrives. A worker that dies has
its unfinished chunks retried on a fresh worker, up to ``RETRIES`` times (Ray does this
itself for its actors: a chunk is a pure function of its jobs, so running it twice is safe).
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Callable, Iterator

from analysis.engine.sweep import Job

RETRIES = 3
EXECUTORS = ("serial", "process", "ray")
RAY_IN_FLIGHT = 2  # chunks queued per Ray actor while the parent is busy, so none idles (1 once it waits)
# Pools cut a sweep into chunks of about equal estimated cost: at least MIN_CHUNKS whatever the
# workers (an interruption loses at most that share per worker, and 1 or 2 workers do the same
# work), and CHUNKS_PER_WORKER per worker on bigger pools so they finish together. Each chunk
# pays one FP32 forward per batch, so more is not better.
MIN_CHUNKS = 8
CHUNKS_PER_WORKER = 3

ActQuantRows = list[tuple[str, str, str, float, int, int, int]]  # (layer, format, tensor, scale, zero, qmin, qmax)


class ExecutorError(RuntimeError):
    """Workers kept failing; the sweep stops with what it has persisted."""


@dataclass
class WorkerSpec:
    """Everything a fresh process needs to rebuild the sweep's model and task (plain data)."""

    model: str
    weights: str | None
    task: str
    task_metric: str | None
    calib: int | None
    seed: int
    metric_name: str
    model_sha256: str
    formats: list[dict]
    incremental: bool  # the parent's traced graph passed its checks; workers trace the same code
    threads: int = 1
    task_options: dict | None = None
    output: str | None = None
    sys_path: list[str] = field(default_factory=lambda: list(sys.path))


def act_quant_rows(model) -> ActQuantRows:
    """A model's calibrated activation quantizers, of layer inputs and outputs, as plain data (they travel
    with chunks)."""
    return [(l, f, tensor, float(a.scale), int(a.zero), a.qmin, a.qmax)
            for tensor, quantizers in (("input", model.act_quant), ("output", model.out_quant))
            for (l, f), a in sorted(quantizers.items())]


def set_act_quant(model, rows: ActQuantRows) -> None:
    import torch

    from analysis.quant.act import ActQuant

    quantizers = {"input": model.act_quant, "output": model.out_quant}
    for layer, fmt, tensor, scale, zero, qmin, qmax in rows:
        zero_point = torch.tensor(zero, dtype=torch.int32)
        quantizers[tensor][(layer, fmt)] = ActQuant(torch.tensor(scale), zero_point, qmin, qmax)


def build_runner(spec: WorkerSpec):
    """Load model and task as the main process did and return a ready ``SweepRunner``."""
    import torch

    from analysis.engine.allocator import keep_freed_memory
    from analysis.quant.formats import QuantFormat
    from analysis.models.loading import load_model
    from analysis.engine.sweep import SweepRunner
    from analysis.data.tasks import load_task

    for p in reversed(spec.sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    torch.set_num_threads(spec.threads)
    keep_freed_memory()
    task = load_task(spec.task, metric=spec.task_metric, calib=spec.calib, seed=spec.seed, model=spec.model,
                     options=spec.task_options)
    model = load_model(spec.model, task.eval_inputs[:3], weights=spec.weights, output=spec.output)
    if model.sha256 != spec.model_sha256:
        raise ExecutorError(f"worker loaded model '{spec.model}' with sha256 {model.sha256[:12]}, "
                            f"expected {spec.model_sha256[:12]} (weights changed on disk?)")
    for d in spec.formats:
        fmt = QuantFormat.from_dict(d)
        model.formats[fmt.name] = fmt
    return SweepRunner(model, task, spec.metric_name, incremental=spec.incremental)


def _run(runner, payload: dict) -> list[dict]:
    set_act_quant(runner.model, payload["act_quant"])
    return runner.run([Job.from_dict(d) for d in payload["jobs"]])


def _payload(chunk: list[Job], act_quant: ActQuantRows) -> dict:
    return {"jobs": [j.to_dict() for j in chunk], "act_quant": act_quant}


class InlinePool:
    """Serial: chunks run in this process, one after another, when results are read."""

    def __init__(self, runner, progress: Callable[[int], None] | None = None) -> None:
        self.runner, self.progress, self.queue = runner, progress, []

    def submit(self, chunk: list[Job], act_quant: ActQuantRows) -> None:
        self.queue.append(chunk)  # the parent's model holds the ranges already

    def results(self) -> Iterator[list[dict]]:
        while self.queue:
            yield self.runner.run(self.queue.pop(0), self.progress)

    def close(self) -> None:
        self.queue.clear()


# --- process pool -------------------------------------------------------------------------
_RUNNER = None


def _init_process_worker(spec: WorkerSpec) -> None:
    global _RUNNER
    _RUNNER = build_runner(spec)


def _ready() -> int:
    return os.getpid()


def _run_chunk_in_process(payload: dict) -> list[dict]:
    return _run(_RUNNER, payload)


class ProcessPool:
    """Chunks on ``workers`` spawned processes (spawn: safe with torch's thread pools)."""

    def __init__(self, spec: WorkerSpec, workers: int) -> None:
        self.spec, self.workers, self.failures = spec, workers, 0
        self.pending: dict = {}  # future -> payload
        self.orphans: list[dict] = []  # payloads submitted to a pool that had broken
        self._start()

    def _start(self) -> None:
        self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"),
                                        initializer=_init_process_worker, initargs=(self.spec,))
        for _ in range(self.workers):  # processes spawn on demand: ask for all of them now
            self.pool.submit(_ready)

    def submit(self, chunk: list[Job], act_quant: ActQuantRows) -> None:
        payload = _payload(chunk, act_quant)
        try:
            self.pending[self.pool.submit(_run_chunk_in_process, payload)] = payload
        except BrokenProcessPool:  # a worker died already (e.g. while loading): resubmitted on restart
            self.orphans.append(payload)

    def results(self) -> Iterator[list[dict]]:
        if self.orphans:
            self._restart()
        while self.pending:
            done, _ = wait(self.pending, return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                try:
                    records = fut.result()
                except BrokenProcessPool:
                    broken = True
                    continue
                del self.pending[fut]
                yield records
            if broken:
                self._restart()

    def _restart(self) -> None:
        """A worker died: every unfinished chunk goes to a fresh pool."""
        self.failures += 1
        if self.failures > RETRIES:
            raise ExecutorError(f"worker processes died {self.failures} times; finished jobs are saved, resume with --resume")
        self.pool.shutdown(wait=True, cancel_futures=True)
        payloads = list(self.pending.values()) + self.orphans
        self.pending.clear()
        self.orphans = []
        self._start()
        for p in payloads:
            self.pending[self.pool.submit(_run_chunk_in_process, p)] = p

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# --- Ray ----------------------------------------------------------------------------------
class _RayWorker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.runner = build_runner(spec)

    def run(self, payload: dict) -> list[dict]:
        return _run(self.runner, payload)


class RayPool:
    """Chunks on ``workers`` Ray actors (each loads the model once); a local cluster when no address."""

    def __init__(self, spec: WorkerSpec, workers: int, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ValueError("--executor ray: Ray is not installed (pip install 'quantlens[ray]')") from None
        from ray.exceptions import OutOfMemoryError, RayActorError, WorkerCrashedError

        self.ray = ray
        self.dead_worker = (RayActorError, WorkerCrashedError, OutOfMemoryError)  # after Ray's own retries
        self.started_here = not ray.is_initialized()
        if self.started_here:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            kwargs = {"address": address} if address else {"num_cpus": workers, "include_dashboard": False}
            ray.init(log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(spec.sys_path)}}, **kwargs)
        # a dead actor is restarted (its constructor reloads the model) and its unfinished chunks rerun there
        actor_cls = ray.remote(num_cpus=1, max_restarts=RETRIES, max_task_retries=RETRIES)(_RayWorker)
        self.actors = [actor_cls.remote(spec) for _ in range(workers)]  # they load while the parent works
        self.queue: list[dict] = []
        self.pending: dict = {}  # object ref -> (actor, payload)

    def _dispatch(self, in_flight: int = 1) -> None:
        for actor in self.actors:
            busy = sum(1 for a, _ in self.pending.values() if a is actor)
            while self.queue and busy < in_flight:
                p = self.queue.pop(0)
                self.pending[actor.run.remote(p)] = (actor, p)
                busy += 1

    def submit(self, chunk: list[Job], act_quant: ActQuantRows) -> None:
        self.queue.append(_payload(chunk, act_quant))
        self._dispatch(RAY_IN_FLIGHT)

    def results(self) -> Iterator[list[dict]]:
        self._dispatch()
        while self.pending:
            ready, _ = self.ray.wait(list(self.pending), num_returns=1)
            self.pending.pop(ready[0])
            try:
                records = self.ray.get(ready[0])
            except self.dead_worker as e:  # restarts used up, or a constructor that raised (never restarted)
                why = next((line.strip() for line in reversed(str(e).splitlines()) if line.strip()), type(e).__name__)
                raise ExecutorError(f"a Ray worker stopped for good ({why[:300]}); finished jobs are saved, "
                                    f"resume with --resume") from e
            yield records
            self._dispatch()

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()


def open_pool(executor: str, runner, spec_factory: Callable[[], WorkerSpec], *, workers: int = 2,
              ray_address: str | None = None, progress: Callable[[int], None] | None = None):
    """A started pool for ``executor``; ``submit`` chunks, read ``results()``, then ``close()``."""
    if executor == "serial":
        return InlinePool(runner, progress)
    if executor == "process":
        return ProcessPool(spec_factory(), workers)
    if executor == "ray":
        return RayPool(spec_factory(), workers, ray_address)
    raise ValueError(f"--executor: unknown executor '{executor}'; known: {', '.join(EXECUTORS)}")


def chunked(jobs: list[Job], size: int) -> list[list[Job]]:
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


def balanced_chunks(jobs: list[Job], cost: Callable[[Job], float], budget: float, max_jobs: int) -> list[list[Job]]:
    """Dearest jobs first, cut into chunks of about ``budget`` (a chunk costs its FP32 forward, 1,
    plus its jobs) and at most ``max_jobs`` jobs: the last chunks to finish are the cheap ones."""
    out: list[list[Job]] = []
    current, spent = [], 1.0
    for job in sorted(jobs, key=cost, reverse=True):
        c = cost(job)
        if current and (spent + c > budget or len(current) == max_jobs):
            out.append(current)
            current, spent = [], 1.0
        current.append(job)
        spent += c
    if current:
        out.append(current)
    return out
