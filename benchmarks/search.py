"""MILP search vs a greedy baseline (flip the least sensitive layer first, as AIMET's AMP
does), at every budget, and the MILP's solve time on 1,000 layers x 3 formats.

    .venv/bin/python benchmarks/search.py [--run RUN_DIR]

Both optimise the same projection (``analysis.project.projection.Projector``); the greedy one
starts from FP32 and repeatedly takes the single-layer step down (fp32 -> int8 -> int4)
with the least penalty per byte saved, until the size budget is met.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from analysis import analyze, load_run
from analysis.project.projection import Projector
from analysis.project.search import SearchError, best_policy
from analysis.store.synthetic import synthetic_run


def greedy(p: Projector, max_bytes: float) -> np.ndarray | None:
    codes = np.zeros(len(p.names), dtype=np.int8)
    while p.size(codes) > max_bytes:
        best, best_score = None, np.inf
        for i in range(len(codes)):
            for f in range(codes[i] + 1, p.allowed.shape[1]):
                if not p.allowed[i, f]:
                    continue
                saved = p.bytes[i, codes[i]] - p.bytes[i, f]
                if saved <= 0:
                    continue
                score = (p.penalty[i, f] - p.penalty[i, codes[i]]) / saved
                if score < best_score:
                    best, best_score = (i, f), score
                break  # one step down at a time
        if best is None:
            return None
        codes[best[0]] = best[1]
    return codes


def compare(p: Projector, label: str, budgets: int = 12) -> None:
    lo = p.other_bytes + int(np.where(p.allowed, p.bytes, np.iinfo(np.int64).max).min(axis=1).sum())
    worse = 0
    print(f"{label}: projected metric at each size budget (MILP vs greedy)")
    for b in np.linspace(lo, p.fp32_bytes, budgets):
        g = greedy(p, b)
        try:
            m = best_policy(p, max_bytes=b)
        except SearchError:
            continue
        gm = p.project(g).metric if g is not None else float("nan")
        pen_m, pen_g = float(p.penalty[p.rows, m.codes].sum()), float(p.penalty[p.rows, g].sum()) if g is not None else np.inf
        worse += pen_m > pen_g + 1e-12
        print(f"  budget {b / 1e6:9.4f} MB  MILP {m.projection.metric:.5f} (penalty {pen_m:.3e})  "
              f"greedy {gm:.5f} (penalty {pen_g:.3e})")
    print(f"  budgets where the MILP was worse than greedy: {worse}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a Run to search (default: analyse demo:digits into a temp folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = load_run(args.run) if args.run else analyze("demo:digits", "digits", Path(tmp) / "digits", progress=False)
        compare(Projector(run), run.meta["model"]["name"])
        big = Projector(synthetic_run(Path(tmp) / "synthetic", 1000, seed=1))
        compare(big, "synthetic 1,000-layer Run", budgets=6)
        times = []
        for frac in (0.3, 0.5, 0.7):
            b = big.other_bytes + frac * (big.fp32_bytes - big.other_bytes)
            t0 = time.perf_counter()
            best_policy(big, max_bytes=b)
            times.append(time.perf_counter() - t0)
        print(f"MILP on 1,000 layers x 3 formats: solve times {', '.join(f'{t:.3f} s' for t in times)} "
              f"(max {max(times):.3f} s; target < 1 s)")


if __name__ == "__main__":
    main()
