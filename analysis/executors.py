"""Where sweep chunks run: this process, a local process pool, or a Ray cluster.

Each worker loads the model once (from a plain-data ``WorkerSpec``), then runs chunks of
jobs; results come back as plain records and the caller persists each chunk as it
arrives. A worker that dies has its chunk retried on a fresh worker, up to ``RETRIES``.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Callable, Iterable

from analysis.sweep import Job

RETRIES = 3
EXECUTORS = ("serial", "process", "ray")


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
    act_quant: list[tuple[str, str, float, int, int, int]]
    incremental: bool
    probe: tuple[str, str] | None
    threads: int = 1
    sys_path: list[str] = field(default_factory=lambda: list(sys.path))


def build_runner(spec: WorkerSpec):
    """Load model and task as the main process did and return a ready ``SweepRunner``."""
    import torch

    from analysis.formats import QuantFormat
    from analysis.models.loading import load_model
    from analysis.models.torch_model import ActQuant
    from analysis.sweep import SweepRunner
    from analysis.tasks import load_task

    for p in reversed(spec.sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    torch.set_num_threads(spec.threads)
    task = load_task(spec.task, metric=spec.task_metric, calib=spec.calib, seed=spec.seed)
    model = load_model(spec.model, torch.from_numpy(task.eval_inputs[:2]), weights=spec.weights)
    if model.sha256 != spec.model_sha256:
        raise ExecutorError(f"worker loaded model '{spec.model}' with sha256 {model.sha256[:12]}, "
                            f"expected {spec.model_sha256[:12]} (weights changed on disk?)")
    for d in spec.formats:
        fmt = QuantFormat.from_dict(d)
        model.formats[fmt.name] = fmt
    for layer, fmt, scale, zero, qmin, qmax in spec.act_quant:
        model.act_quant[(layer, fmt)] = ActQuant(torch.tensor(scale), torch.tensor(zero, dtype=torch.int32), qmin, qmax)
    return SweepRunner(model, task, spec.metric_name, incremental=spec.incremental, probe=spec.probe)


# --- process pool -------------------------------------------------------------------------
_RUNNER = None


def _init_process_worker(spec: WorkerSpec) -> None:
    global _RUNNER
    _RUNNER = build_runner(spec)


def _run_chunk_in_process(job_dicts: list[dict]) -> list[dict]:
    return _RUNNER.run([Job.from_dict(d) for d in job_dicts])


def run_process_pool(spec: WorkerSpec, chunks: list[list[Job]], workers: int, on_records: Callable[[list[dict]], None]) -> None:
    """Chunks on ``workers`` spawned processes (spawn: safe with torch's thread pools)."""
    todo = list(chunks)
    failures = 0
    while todo:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                   initializer=_init_process_worker, initargs=(spec,))
        try:
            futures = {pool.submit(_run_chunk_in_process, [j.to_dict() for j in c]): c for c in todo}
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in done:
                    chunk = futures.pop(fut)
                    on_records(fut.result())
                    todo.remove(chunk)
        except BrokenProcessPool:
            failures += 1
            if failures > RETRIES:
                raise ExecutorError(f"worker processes died {failures} times; finished jobs are saved, resume with --resume") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# --- Ray ----------------------------------------------------------------------------------
class _RayWorker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.runner = build_runner(spec)

    def run(self, job_dicts: list[dict]) -> list[dict]:
        return self.runner.run([Job.from_dict(d) for d in job_dicts])

    def pid(self) -> int:
        return os.getpid()


def run_ray(spec: WorkerSpec, chunks: list[list[Job]], workers: int, on_records: Callable[[list[dict]], None],
            address: str | None = None) -> None:
    """Chunks on ``workers`` Ray actors (each loads the model once); a local cluster when no address."""
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray: Ray is not installed (pip install 'quantlens[ray]')") from None
    from ray.exceptions import OutOfMemoryError, RayActorError, WorkerCrashedError

    dead_worker = (RayActorError, WorkerCrashedError, OutOfMemoryError)  # a worker that died: retry its chunk

    started_here = not ray.is_initialized()
    if started_here:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs = {"address": address} if address else {"num_cpus": workers, "include_dashboard": False}
        ray.init(log_to_driver=False, configure_logging=False, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(spec.sys_path)}}, **kwargs)
    try:
        actor_cls = ray.remote(num_cpus=1, max_restarts=0)(_RayWorker)
        actors = [actor_cls.remote(spec) for _ in range(workers)]
        queue, pending, failures = list(chunks), {}, 0
        for a in actors:
            if queue:
                c = queue.pop(0)
                pending[a.run.remote([j.to_dict() for j in c])] = (a, c)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            actor, chunk = pending.pop(ref)
            try:
                on_records(ray.get(ref))
            except dead_worker:
                failures += 1
                if failures > RETRIES:
                    raise ExecutorError(f"Ray workers died {failures} times; finished jobs are saved, resume with --resume") from None
                actor = actor_cls.remote(spec)  # replace the dead actor, retry its chunk
                queue.insert(0, chunk)
            if queue:
                c = queue.pop(0)
                pending[actor.run.remote([j.to_dict() for j in c])] = (actor, c)
    finally:
        if started_here:
            ray.shutdown()


def chunked(jobs: list[Job], size: int) -> list[list[Job]]:
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


def run_chunks(executor: str, runner, spec_factory: Callable[[], WorkerSpec], chunks: Iterable[list[Job]],
               on_records: Callable[[list[dict]], None], *, workers: int = 2, ray_address: str | None = None,
               progress: Callable[[int], None] | None = None) -> None:
    """Dispatch ``chunks`` to the named executor; ``on_records`` persists each finished chunk."""
    chunks = list(chunks)
    if executor == "serial":
        for c in chunks:
            on_records(runner.run(c, progress))
    elif executor == "process":
        run_process_pool(spec_factory(), chunks, workers, on_records)
    elif executor == "ray":
        run_ray(spec_factory(), chunks, workers, on_records, address=ray_address)
    else:
        raise ValueError(f"--executor: unknown executor '{executor}'; known: {', '.join(EXECUTORS)}")
