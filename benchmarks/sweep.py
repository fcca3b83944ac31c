"""The engine's sweep vs an independent naive loop on demo:minilm: same jobs, same data, same padding,
same thread count, each side in its own process; wall time, peak RSS and the per-layer numbers of both.

    .venv/bin/python benchmarks/sweep.py            # 37 Linear x int8/int4 on the 128 evaluation snippets
    .venv/bin/python benchmarks/sweep.py --quick    # every 3rd layer, 64 snippets, 16 calibration snippets

The naive loop is what a careful engineer writes without QuantLens: for each (layer, format) quantize
that layer's weight (``fake_quantize_weight``, computed once per job), quantize its input and requantize
its output for int8 as the engine does (ranges from min/max hooks over the same calibration batches),
run the whole model under ``torch.inference_mode`` over the evaluation snippets (sorted by length,
each batch of 32 cut to its longest text), score against the FP32 outputs, restore. The engine side is
``SweepRunner`` on the same jobs, cut into chunks as ``quantlens analyze --executor serial`` cuts them
(whole-model policies, tables and the Run folder are not part of either side). Both sides calibrate;
the ratio is printed for the jobs alone and for the whole process. Both keep freed memory
(``analysis.engine.allocator``), as the CLI's sweep processes do.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _cpu() -> str:
    model, flags = "", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    isa = sorted(flags & {"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16"})
    return f"{model}; {os.cpu_count()} logical CPUs; {' '.join(isa)}"


def _data(quick: bool):
    """The task (evaluation already sorted by length) and the layers swept, identical on both sides."""
    from analysis.data.tasks import minilm_task

    t = minilm_task()
    if quick:
        t.eval_inputs, t.calib_inputs = t.eval_inputs[:64], t.calib_inputs[:16]
    assert t.batch_size == BATCH
    return t


def _layer_names(module, quick: bool) -> list[str]:
    from torch import nn

    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return names[::3] if quick else names


def side_engine(quick: bool, formats: list[str]) -> dict:
    import torch

    from analysis.engine.analyze import SERIAL_CHUNK
    from analysis.engine.executors import chunked
    from analysis.engine.stats import calibrate, collect_activation_stats
    from analysis.engine.sweep import SweepRunner, plan_jobs
    from analysis.models.loading import load_model
    from analysis.quant.formats import get_format

    t0 = time.perf_counter()
    task = _data(quick)
    tm = load_model("demo:minilm", task.eval_inputs[:3])
    fmts = [get_format(f) for f in formats]
    calibrate(tm, collect_activation_stats(tm, task.calib_batches), fmts)
    layers = _layer_names(tm.module, quick)
    jobs = plan_jobs({}, [(l, f) for l in layers for f in formats], {})
    runner = SweepRunner(tm, task, "embedding")  # traces the model and checks the trace on every layer
    setup_rss = _peak_rss_mb()
    t1 = time.perf_counter()
    records = [r for chunk in chunked(jobs, SERIAL_CHUNK) for r in runner.run(chunk)]
    t2 = time.perf_counter()
    return {"path": runner.path, "setup_s": t1 - t0, "jobs_s": t2 - t1, "threads": torch.get_num_threads(),
            "setup_peak_rss_mb": setup_rss, "results": {f"{r['layer']}|{r['format']}": r["result"] for r in records}}


def side_loop(quick: bool, formats: list[str]) -> dict:
    import torch
    from torch import nn

    from analysis.data.metrics import MetricState
    from analysis.data.minilm import PAD_ID, minilm_model
    from analysis.quant.formats import get_format
    from analysis.quant.primitives import choose_qparams, fake_quantize, fake_quantize_weight, qrange

    t0 = time.perf_counter()
    task = _data(quick)
    model = minilm_model()

    def batches(ids):  # sorted already; cut each batch to its longest text
        for s in range(0, len(ids), BATCH):
            b = ids[s:s + BATCH]
            end = int((b != PAD_ID).any(0).nonzero()[0][-1]) + 1
            yield torch.from_numpy(b[:, :end].copy())

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    # min/max of each Linear's input and of its kernel output: a 3-D input exports as MatMul + Add, whose
    # MatMul output (before the bias) is what onnxruntime requantizes; a 2-D input is one Gemm
    ranges: dict[tuple[str, str], list[float]] = {}

    def observe(name):
        def hook(m, args, out):
            x = args[0]
            kernel_out = out - m.bias if (m.bias is not None and x.dim() != 2) else out
            for key, v in (((name, "in"), x), ((name, "out"), kernel_out)):
                r = ranges.setdefault(key, [float("inf"), float("-inf")])
                r[0], r[1] = min(r[0], float(v.min())), max(r[1], float(v.max()))
        return hook

    hooks = [m.register_forward_hook(observe(n)) for n, m in linears.items()]
    with torch.inference_mode():
        for x in batches(task.calib_inputs):
            model(x)
        for h in hooks:
            h.remove()
        reference = [model(x) for x in batches(task.eval_inputs)]
    setup_rss = _peak_rss_mb()
    t1 = time.perf_counter()

    def act_q(lo, hi, bits, symmetric):
        scale, zero = choose_qparams(torch.tensor(lo), torch.tensor(hi), bits, symmetric)
        qmin, qmax = qrange(bits, symmetric)
        return lambda v: fake_quantize(v, scale, zero, qmin, qmax)

    results = {}
    for name in _layer_names(model, quick):
        mod = linears[name]
        for fname in formats:
            fmt = get_format(fname)
            saved = mod.weight.data
            mod.weight.data = fake_quantize_weight(saved, fmt.weight).contiguous()
            hooks = []
            if fmt.activation is not None:
                a = fmt.activation
                if a.dynamic:
                    def pre(m, args, a=a):
                        v = args[0]
                        scale, zero = choose_qparams(v.min(), v.max(), a.bits, a.symmetric)
                        return (fake_quantize(v, scale, zero, *qrange(a.bits, a.symmetric)),)
                else:
                    q_in = act_q(*ranges[(name, "in")], a.bits, a.symmetric)
                    q_out = act_q(*ranges[(name, "out")], a.bits, a.symmetric)
                    pre = lambda m, args, q=q_in: (q(args[0]),)  # noqa: E731

                    def post(m, args, out, q=q_out):
                        if m.bias is not None and args[0].dim() != 2:
                            return q(out - m.bias) + m.bias
                        return q(out)

                    hooks.append(mod.register_forward_hook(post))
                hooks.append(mod.register_forward_pre_hook(pre))
            state = MetricState("embedding")
            try:
                with torch.inference_mode():
                    for x, y_ref in zip(batches(task.eval_inputs), reference):
                        state.update(model(x), y_ref, None)
            finally:
                for h in hooks:
                    h.remove()
                mod.weight.data = saved
            results[f"{name}|{fname}"] = state.result()
    t2 = time.perf_counter()
    return {"path": "naive loop", "setup_s": t1 - t0, "jobs_s": t2 - t1, "threads": torch.get_num_threads(),
            "setup_peak_rss_mb": setup_rss, "results": results}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(side: str, quick: bool, formats: list[str], out: str) -> None:
    import torch

    from analysis.engine.allocator import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()
    rec = {"engine": side_engine, "loop": side_loop}[side](quick, formats)
    rec["peak_rss_mb"] = _peak_rss_mb()
    Path(out).write_text(json.dumps(rec))


def _run_side(side: str, args) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        cmd = [sys.executable, __file__, "--side", side, "--json", str(out), "--formats", args.formats]
        if args.quick:
            cmd.append("--quick")
        load_before = _load()
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        rec = json.loads(out.read_text())
    rec["process_s"] = time.perf_counter() - t0
    rec["load"] = f"{load_before} -> {_load()}"
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="every 3rd Linear, 64 evaluation and 16 calibration snippets")
    ap.add_argument("--formats", default="int8,int4")
    ap.add_argument("--side", choices=("engine", "loop"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    if args.side:
        return _child(args.side, args.quick, formats, args.json)

    mode = "quick: every 3rd Linear, 64 eval + 16 calib snippets" if args.quick else "full: 37 Linear, 128 eval + 64 calib snippets"
    print(f"demo:minilm, formats {','.join(formats)}, {mode}; batch {BATCH}, one torch thread per side")
    print(f"CPU: {_cpu()}")
    loop = _run_side("loop", args)
    engine = _run_side("engine", args)
    n = len(engine["results"])
    for label, r in (("naive loop", loop), (f"engine ({engine['path']})", engine)):
        print(f"{label:<28} jobs {r['jobs_s']:7.1f} s ({r['jobs_s'] / n:5.2f} s/job)  whole process {r['process_s']:7.1f} s  "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB (setup {r['setup_peak_rss_mb']:.0f})  threads {r['threads']}  load avg {r['load']}")
    print(f"engine / loop: time (jobs) {engine['jobs_s'] / loop['jobs_s']:.2f}x, time (whole process) "
          f"{engine['process_s'] / loop['process_s']:.2f}x, peak RSS {engine['peak_rss_mb'] / loop['peak_rss_mb']:.2f}x  "
          f"({n} jobs)")
    worst = {k: max(abs(engine["results"][j][k] - loop["results"][j][k]) for j in engine["results"])
             for k in ("metric", "loss", "kl")}
    same = sum(engine["results"][j] == loop["results"][j] for j in engine["results"])
    print(f"per-layer numbers: {same}/{n} jobs identical; largest |engine - loop|: "
          + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
