"""Parallel sweeps and memory: 2 workers vs 1 (local process pool and Ray) on the MiniLM
sweep, and the peak memory of a sweep on a BERT-base-sized model (random weights).

    .venv/bin/python benchmarks/scale.py [--executors process,ray] [--skip-serial] [--skip-bert]

The MiniLM sweep is the demo's own: `quantlens analyze demo:minilm` on its bundled task (64
calibration and 128 evaluation snippets in batches of 32, 74 layer jobs, 2 uniform and 8 random
policies), latency measurement off. Each sweep runs in its own process, so wall times and peak
RSS are those of a user's command; worker counts are compared side by side in this one run,
one thread per worker.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
QUANTLENS = str(Path(sys.executable).parent / "quantlens")
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}


def bert_base():
    """A BERT-base-sized encoder (about 110 M parameters) with random weights: for memory only."""
    import torch

    from analysis.data.minilm import MiniLMEmbedder

    torch.manual_seed(0)
    return MiniLMEmbedder(BERT_BASE).eval()


def _task(tmp: Path, n_eval: int) -> str:
    from analysis.data.minilm import minilm_arrays

    a = minilm_arrays(n_calib=32, n_eval=n_eval)
    p = tmp / f"minilm-{n_eval}.npz"
    np.savez(p, inputs=a["eval_inputs"], calib_inputs=a["calib_inputs"])
    return str(p)


def _analyze(model: str, task: str | None, out: Path, *extra: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB, the largest process of the command) of one analysis."""
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "RAY_AUTH_MODE": "disabled"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    task_args = ["--task", task, "--metric", "cosine", "--random-policies", "0"] if task else []
    p = subprocess.run([QUANTLENS, "analyze", model, *task_args, "--out", str(out), "--quiet", "--no-latency", "--verify-policies", "0", *extra],
                       capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"analyze failed: {p.stderr.strip().splitlines()[-1]}")
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1e6
    return wall, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--executors", default="process,ray", help="pool executors to compare (default process,ray)")
    ap.add_argument("--skip-ray", action="store_true", help="same as --executors process")
    ap.add_argument("--skip-serial", action="store_true", help="no in-process reference sweep")
    ap.add_argument("--skip-bert", action="store_true")
    ap.add_argument("--only-bert", action="store_true", help="only the BERT-base peak-memory figure")
    args = ap.parse_args()
    print(f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())} (other work on the cores skews ratios)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        executors = [] if args.only_bert else [e for e in args.executors.split(",") if e and not (args.skip_ray and e == "ray")]
        if executors:
            print(f"MiniLM demo sweep: 37 Linear layers x int8,int4 + 10 policies on 128 snippets, {os.cpu_count()} cores")
        for ex in executors:
            t = {}
            for w in (1, 2):
                t[w], _ = _analyze("demo:minilm", None, tmp / f"{ex}-{w}", "--executor", ex, "--workers", str(w))
                print(f"  {ex:<8} workers={w}: {t[w]:7.1f} s")
            print(f"  {ex:<8} speed-up 2 vs 1 worker: x{t[1] / t[2]:.2f} (target >= 1.6)")
        if executors and not args.skip_serial:
            serial, _ = _analyze("demo:minilm", None, tmp / "serial")
            print(f"  serial (in-process, for reference): {serial:7.1f} s")
        if not args.skip_bert:
            bert_task = _task(tmp, 16)
            wall, peak = _analyze("scale:bert_base", bert_task, tmp / "bert")
            import torch  # noqa: F401  (parameter count only)

            n = sum(p.numel() for p in bert_base().parameters())
            print(f"BERT-base-sized sweep ({n / 1e6:.0f} M params, 73 Linear layers x 2 formats, 16 snippets): "
                  f"{wall:.0f} s, peak RSS {peak:.2f} GB")
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
