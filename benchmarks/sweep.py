"""Incremental sweep (recompute only downstream of the perturbed layer) vs a naive sweep
(a full forward per job), on the same jobs, measured side by side in one run.

    .venv/bin/python benchmarks/sweep.py [--repeats 3]

Prints the median wall time of each and their ratio, for the demo CNN and for a deeper
residual MLP (24 Linear layers, random weights: only its timing matters here).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

from analysis.data.demos import digits_model
from analysis.quant.formats import INT4, INT8
from analysis.models.torch_model import TorchModel
from analysis.engine.stats import calibrate, collect_activation_stats
from analysis.engine.sweep import run_sweep
from analysis.data.tasks import Task, digits_task


class ResidualMLP(nn.Module):
    def __init__(self, width: int = 256, blocks: int = 12) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
                                    for _ in range(blocks))
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        for b in self.blocks:
            x = self.norm(x + b(x))
        return x


def _prepared(module, task):
    tm = TorchModel(module, torch.from_numpy(task.eval_inputs[:2]), name="bench", source="bench")
    calibrate(tm, collect_activation_stats(tm, task.calib_batches), [INT8, INT4])
    jobs = [(l.name, f.name) for l in tm.layers() for f in (INT8, INT4) if tm.skip_reason(l.name, f) is None]
    return tm, jobs


def compare(label: str, tm, task, metric: str, jobs, repeats: int) -> None:
    times = {True: [], False: []}
    for _ in range(repeats):
        for incremental in (True, False):  # alternate so drift hits both alike
            t0 = time.perf_counter()
            res = run_sweep(tm, task, metric, jobs, {}, incremental=incremental)
            times[incremental].append(time.perf_counter() - t0)
            assert res.path == ("fx-incremental" if incremental else "full-forward")
    inc, full = statistics.median(times[True]), statistics.median(times[False])
    print(f"{label:<28} jobs={len(jobs):>3}  naive {full:7.3f} s  incremental {inc:7.3f} s  "
          f"speed-up x{full / inc:.2f}  (median of {repeats}, torch threads={torch.get_num_threads()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = digits_task()
    tm, jobs = _prepared(digits_model(), task)
    compare("demo:digits (7 layers)", tm, task, "accuracy", jobs, args.repeats)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(544, 256)).astype(np.float32)
    mlp_task = Task("random", "gaussian inputs", x[:32], x[32:], None, metric="cosine")
    tm, jobs = _prepared(ResidualMLP(), mlp_task)
    compare("residual MLP (24 layers)", tm, mlp_task, "cosine", jobs, args.repeats)


if __name__ == "__main__":
    main()
