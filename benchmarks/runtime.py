"""FP32 vs all-INT8 vs all-INT4 vs the best known policy, in onnxruntime on real kernels.

Usage: .venv/bin/python benchmarks/runtime.py [--model demo:digits] [--task digits] [--repeats 200]
       [--batch 32] [--threads 1]

All four models are timed in one run, round-robin (one session.run each per round), so
the ratios compare like with like on a shared machine. "Best known" is built from the
Run's own measurements: per layer, the format with the lowest measured latency among those
whose single-layer metric drop is at most --max-drop (default 0.005).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis import analyze  # noqa: E402
from analysis.runtime.latency import measure_latency, timed_runs, uniform_policy, _stats  # noqa: E402
from analysis.runtime.onnx_quantize import quantize_model  # noqa: E402
from analysis.runtime.session import resolve_model, resolve_task  # noqa: E402
from analysis.runtime.verify import _evaluate  # noqa: E402


def best_known(run, max_drop: float) -> dict[str, str]:
    sens = run.sensitivity[run.sensitivity["status"] == "ok"].set_index(["layer", "format"])
    lat = run.cost.set_index(["layer", "format"])["latency_ms"]
    sign = 1 if run.higher_is_better else -1
    policy = {}
    for layer in run.layer_names:
        options = [("fp32", lat.get((layer, "fp32"), np.inf))]
        for fmt in run.formats:
            if (layer, fmt) in sens.index and sign * sens.loc[(layer, fmt), "metric_delta"] >= -max_drop:
                options.append((fmt, lat.get((layer, fmt), np.inf)))
        policy[layer] = min(options, key=lambda o: o[1])[0]
    return policy


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo:digits")
    p.add_argument("--task", default="digits")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-drop", type=float, default=0.005)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="quantlens-bench-") as tmp:
        t0 = time.perf_counter()
        run = analyze(args.model, args.task, Path(tmp) / "run", progress=False, threads=args.threads)
        t_analyze = time.perf_counter() - t0
        t0 = time.perf_counter()
        measure_latency(run, repeats=50, batch=args.batch, threads=args.threads)
        t_latency = time.perf_counter() - t0
        task = resolve_task(run)
        rm = resolve_model(run, task)
        policies = {"fp32": {}, **{f"all-{f}": uniform_policy(run, f) for f in run.formats},
                    "best known": {k: v for k, v in best_known(run, args.max_drop).items() if v != "fp32"}}
        models, kernels = {}, {}
        for name, pol in policies.items():
            q = quantize_model(rm.model, rm.layers, rm.onnx_policy(pol), rm.binding, task.calib_inputs)
            models[name] = q.model
            kernels[name] = sorted(set(q.kernels.values()))
        x = task.eval_inputs[: args.batch]
        feed = {rm.binding.name: next(rm.binding.chunks(x))[0]}
        times = timed_runs(models, feed, threads=args.threads, repeats=args.repeats, warmup=10)
        metric = run.meta["metric"]["name"]
        print(f"model {args.model}, task {args.task}: onnxruntime {ort.__version__} CPUExecutionProvider, "
              f"{args.threads} thread(s), batch {len(x)}, {args.repeats} round-robin repeats, ORT_ENABLE_ALL")
        print(f"cpu: {run.meta['cpu'].get('model', '?')}; isa: {', '.join(run.meta['cpu'].get('isa', []))}")
        print(f"(analyze {t_analyze:.1f} s, measure_latency {t_latency:.1f} s)")
        fp32_ms = _stats(times["fp32"])[0]
        fp32_size = models["fp32"].ByteSize()
        print(f"{'policy':<11} {'median ms':>10} {'IQR ms':>8} {'x fp32':>7} {'file MB':>8} {'size x':>7} {metric:>9}  kernels")
        for name, m in models.items():
            med, iqr = _stats(times[name])
            score = _evaluate(m, rm, task, metric, args.threads).result()["metric"]
            print(f"{name:<11} {med:>10.3f} {iqr:>8.3f} {med / fp32_ms:>7.2f} {m.ByteSize() / 1e6:>8.3f} "
                  f"{fp32_size / m.ByteSize():>7.2f} {score:>9.4f}  {', '.join(kernels[name]) or 'Conv/Gemm fp32'}")
        print("best known: " + ", ".join(f"{k}={v}" for k, v in policies["best known"].items()) if policies["best known"]
              else "best known: every layer fastest in fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
