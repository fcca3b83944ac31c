"""Does what QuantLens projects hold for the onnxruntime model a user ships? One table, one run.

    .venv/bin/python benchmarks/fidelity.py [--run runs/fidelity-minilm] [--policies 12] [--skip-digits]

MiniLM (demo:minilm, formats int8, int4, int8-dyn; analyze verifies the uniform policies and four
random ones in onnxruntime and fits the projection to them):
  * 12 random mixed policies the projection never saw, and the `--max-drop 0.005` search result, are
    each projected first (metric and band), then verified in onnxruntime: how many land inside their
    band, and the mean |projected - measured|;
  * side by side, the baseline a user would try first: onnxruntime's one-line
    `quantize_dynamic(per_channel=True, op_types_to_quantize=["MatMul"])`, and all-int8-dyn.
Digits: the searched policies for drop budgets of 0.5, 1 and 2 points, verified: none may be slower than FP32.

One thread everywhere; latency is onnxruntime end to end on the Run's latency batch, median of 20, the
FP32 model timed in the same loop. Prints the load average and the CPU's ISA flags beside the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from analysis.api import (FORMAT_CODE, Policy, Projector, analyze, best_policy, coupled_groups, load_run,
                          policy_from_codes, verify_policy)
from analysis.engine.analyze import cpu_info
from analysis.engine.plan import random_mixed_policies
from analysis.quant.formats import get_format


def _random_unseen(run, k: int, seed: int) -> list[dict[str, str]]:
    """``k`` random mixed policies none of which the Run measured (another seed than the sweep's)."""
    seen = {tuple(sorted(json.loads(j or "{}").items())) for j in run.policies["layers_json"]}
    layers = [type("L", (), {"name": n}) for n in run.layer_names]
    skip = {(r.layer, r.format): "skipped" for r in run.sensitivity.itertuples(index=False) if r.status != "ok"}
    fmts = [get_format(f) for f in run.formats]
    return random_mixed_policies(layers, fmts, skip, k, seed, exclude=seen)


def _row(name, projected, band, r, fp32_ms) -> dict:
    inside = None if band is None or not np.isfinite(band) else abs(projected - r["metric"]) <= band + 1e-12
    return {"name": name, "projected": projected, "band": band, "measured": r["metric"], "inside": inside,
            "latency_ms": r["latency_ms"], "fp32_ms": fp32_ms, "mb": r["bytes"] / 1e6,
            "file_mb": r.get("file_bytes", np.nan) / 1e6}


def _print(rows: list[dict], metric: str) -> None:
    print(f"  {'policy':<28} {'projected':>17} {'measured':>9} {'in band':>8} {'latency':>10} {'vs fp32':>8} "
          f"{'size MB':>8} {'file MB':>8}")
    for r in rows:
        proj = "" if r["projected"] is None else f"{r['projected']:.4f}" + (
            f" ± {r['band']:.4f}" if r["band"] is not None and np.isfinite(r["band"]) else "")
        inside = {True: "yes", False: "NO", None: ""}[r["inside"]]
        print(f"  {r['name']:<28} {proj:>17} {r['measured']:>9.4f} {inside:>8} {r['latency_ms']:>8.2f}ms "
              f"{r['latency_ms'] / r['fp32_ms']:>7.2f}x {r['mb']:>8.3f} {r['file_mb']:>8.3f}")
    print(f"  ({metric}; latency: onnxruntime end to end, 1 thread)")


def _ort_quantize_dynamic(run, threads: int = 1) -> dict:
    """onnxruntime's own one-line dynamic INT8 on the Run's FP32 ONNX model, measured like verify."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from analysis.runtime.latency import end_to_end
    from analysis.runtime.session import resolve_model, resolve_task
    from analysis.runtime.verify import _evaluate

    task = resolve_task(run)
    rm = resolve_model(run, task)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "dyn.onnx"
        onnx.save(rm.model, str(src))
        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"])
        q = onnx.load(str(dst))
        size = dst.stat().st_size
    r = _evaluate(q, rm, task, run.meta["metric"]["name"], threads).result()
    x = task.eval_inputs[: int(run.meta.get("latency", {}).get("batch", 32))]
    feed = {rm.binding.name: next(rm.binding.chunks(x))[0]}
    lat = end_to_end({"fp32": rm.model, "q": q}, feed, threads=threads, repeats=20)
    return {"metric": r["metric"], "latency_ms": lat["q"][0], "fp32_ms": lat["fp32"][0], "bytes": size,
            "file_bytes": size}


def minilm(run_dir: Path, k: int) -> None:
    if (run_dir / "run.json").is_file() and load_run(run_dir).status == "complete":
        print(f"MiniLM Run found at {run_dir}")
    else:
        t0 = time.perf_counter()
        analyze("demo:minilm", "minilm", run_dir, formats=["int8", "int4", "int8-dyn"], latency=False,
                threads=1, overwrite=run_dir.exists(), progress=True)
        print(f"MiniLM analysed in {time.perf_counter() - t0:.0f} s (sweep, then the uniform policies and four "
              f"random ones verified in onnxruntime)")
    run = load_run(run_dir)
    metric = run.meta["metric"]["name"]
    p = Projector(run)
    print(f"projection: {p.band_method}")
    # everything is projected before anything new is verified: verify rows feed the next projection
    plans = [(f"unseen-{i}", pol) for i, pol in enumerate(_random_unseen(run, k, seed=12345), start=1)]
    res = best_policy(p, max_drop=0.005, groups=coupled_groups(run))
    for n in res.notes:
        print(f"note (search): {n}")
    plans.append(("search --max-drop 0.005", res.layers(p.names)))
    projected = {}
    for name, pol in plans:
        pr = p.project(np.array([FORMAT_CODE[pol.get(n, "fp32")] for n in p.names]))
        projected[name] = (pr.metric, pr.band)
    rows = []
    for i, (name, pol) in enumerate(plans, start=1):
        print(f"verify {i}/{len(plans)}: {name}", file=sys.stderr)
        r = verify_policy(run, Policy(run.model_sha256, pol), name=f"fidelity {name}", kind="user", repeats=20)
        rows.append(_row(name, *projected[name], r, r["fp32_latency_ms"]))
    dyn = run.policies.set_index("name")
    baseline = []
    for name in ("all-int8-dyn (onnxruntime)", "all-int8 (onnxruntime)", "all-int4 (onnxruntime)"):
        if name in dyn.index:  # measured by analyze; time it again beside the others
            pol = json.loads(dyn.loc[name, "layers_json"])
            r = verify_policy(run, Policy(run.model_sha256, pol), name=name, kind="verified", repeats=20)
            baseline.append(_row(name, None, None, r, r["fp32_latency_ms"]))
    q = _ort_quantize_dynamic(run)
    baseline.append(_row("ort quantize_dynamic (1 line)", None, None, q, q["fp32_ms"]))
    print(f"\nMiniLM ({run.meta['data']['n_eval']} evaluation snippets), FP32 {metric} "
          f"{run.meta['baseline']['metric']:.4f}:")
    _print(rows + baseline, metric)
    inside = sum(1 for r in rows if r["inside"])
    errs = [abs(r["projected"] - r["measured"]) for r in rows]
    print(f"  inside the projected band: {inside} of {len(rows)} (target >= 11 of 13); mean |projected - measured| "
          f"{np.mean(errs):.4f} (target <= 0.002)")
    s = rows[-1]
    for b in baseline:
        dominates = s["measured"] >= b["measured"] - 1e-12 and s["latency_ms"] <= b["latency_ms"]
        print(f"  searched policy vs {b['name']}: {metric} {s['measured']:.4f} vs {b['measured']:.4f}, latency "
              f"{s['latency_ms'] / s['fp32_ms']:.2f}x vs {b['latency_ms'] / b['fp32_ms']:.2f}x FP32 -> "
              f"{'equal or better on both' if dominates else 'NOT better on both'}")


def digits(tmp: Path) -> None:
    run = analyze("demo:digits", "digits", tmp / "digits", threads=1, progress=False)
    p = Projector(run)
    rows = []
    for drop in (0.005, 0.01, 0.02):
        res = best_policy(p, max_drop=drop, groups=coupled_groups(run))
        pol = policy_from_codes(run, res.codes)
        r = verify_policy(run, pol, name=f"drop {drop}", kind="search", repeats=20)
        rows.append(_row(f"search --max-drop {drop}", res.projection.metric, res.projection.band, r,
                         r["fp32_latency_ms"]))
    print(f"\ndigits, FP32 accuracy {run.meta['baseline']['metric']:.4f}:")
    _print(rows, "accuracy")
    slow = [r["name"] for r in rows if r["latency_ms"] > r["fp32_ms"] * 1.05]
    print("  every searched policy verifies no slower than FP32 (5 % timing noise allowed)" if not slow
          else f"  SLOWER than FP32: {', '.join(slow)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/fidelity-minilm", help="MiniLM Run folder (made if missing)")
    ap.add_argument("--policies", type=int, default=12, help="random mixed policies the projection never saw")
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    info = cpu_info()
    print(f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; CPU {info['model']} "
          f"({', '.join(info['isa'])})")
    if not args.skip_minilm:
        minilm(Path(args.run), args.policies)
    if not args.skip_digits:
        with tempfile.TemporaryDirectory(prefix="quantlens-fidelity-") as tmp:
            digits(Path(tmp))
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
