"""How wrong is the projection? Measure held-out random policies (never used for calibration)
and compare with what the Run projects for them.

    .venv/bin/python benchmarks/projection.py [--run RUN_DIR] [--policies 20]

Prints the mean |projected - measured| metric, the Spearman rank correlation of projected
and measured metric (and of the projected and measured KL / loss penalty, which stays
informative when the metric itself hardly moves), and how often the measured value fell
inside the projected band.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from analysis import analyze, load_run
from analysis.engine.plan import random_mixed_policies
from analysis.store.policy import FORMAT_CODE
from analysis.project.projection import Projector
from analysis.engine.remeasure import measure_policies


def held_out_policies(run, k: int) -> dict[str, dict[str, str]]:
    measured = {tuple(sorted(__import__("json").loads(s).items())) for s in run.policies["layers_json"]}
    sens = run.sensitivity
    skip = {(r.layer, r.format): r.reason for r in sens.itertuples() if r.status == "skipped"}
    from analysis.quant.formats import get_format

    layers = [type("L", (), {"name": n}) for n in run.layer_names]
    fmts = [get_format(f) for f in run.formats]
    pols = random_mixed_policies(layers, fmts, skip, k, seed=run.meta.get("seed", 0) + 1000, exclude=measured)
    return {f"held-out-{i}": p for i, p in enumerate(pols, start=1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a Run (default: analyse demo:digits into a temp folder)")
    ap.add_argument("--policies", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = load_run(args.run) if args.run else analyze("demo:digits", "digits", Path(tmp) / "d", progress=False)
        p = Projector(run)
        pols = held_out_policies(run, args.policies)
        measured = measure_policies(run, pols)
        index = {n: i for i, n in enumerate(p.names)}
        proj, meas, pen_p, pen_m, inside = [], [], [], [], 0
        use_kl = p.calibration is not None and p.calibration.kind == "kl"
        for name, pol in pols.items():
            codes = np.zeros(len(p.names), dtype=np.int8)
            for layer, fmt in pol.items():
                codes[index[layer]] = FORMAT_CODE[fmt]
            pr = p.project(codes)
            m = measured[name]
            proj.append(pr.metric)
            meas.append(m["metric"])
            pen_p.append(float(p.penalty[p.rows, codes].sum()) * (p.calibration.map.a if p.calibration else 1.0))
            pen_m.append(m["kl"] if use_kl else max(m["loss"] - p.base_loss, 0.0))
            inside += pr.band is not None and abs(pr.metric - m["metric"]) <= pr.band + 1e-12
        proj, meas = np.array(proj), np.array(meas)
        err = np.abs(proj - meas)
        rho = spearmanr(proj, meas).statistic if np.ptp(meas) > 0 and np.ptp(proj) > 0 else float("nan")
        rho_pen = spearmanr(pen_p, pen_m).statistic
        name = run.meta["metric"]["name"]
        print(f"{run.meta['model']['name']}: {len(pols)} held-out random policies, metric {name}")
        print(f"  method: {p.band_method}")
        print(f"  mean |projected - measured| {name}: {err.mean():.5f} (max {err.max():.5f}); "
              f"measured spread {meas.min():.5f}..{meas.max():.5f}")
        print(f"  Spearman(projected, measured) {name}: {rho:.3f}" + ("  (undefined: the measured metric did not move)" if rho != rho else ""))
        print(f"  Spearman(projected, measured) {'KL to FP32' if use_kl else 'loss penalty'}: {rho_pen:.3f}")
        print(f"  measured inside the projected band: {inside}/{len(pols)} (band ± {p.band})")


if __name__ == "__main__":
    main()
