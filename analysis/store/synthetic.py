"""A synthetic Run: generated numbers with the shape of a real one, labelled as such.

Used by the dashboard benchmark (1,000 layers) and by dashboard tests that should not
wait for a real analysis. Nothing in it is a measurement: ``run.json`` says
``"synthetic": true``, the model is named ``synthetic:<n_layers>`` and every
``measured_on`` field says the numbers were generated.

The generator keeps the relations a real Run has: bytes follow the formats' storage
layout exactly, INT4 hurts more than INT8, a layer whose input dimension is not a
multiple of 32 is skipped for INT4, a few layers do not reach the output (zero
sensitivity), and whole-model losses are slightly super-additive in the layers'.

:func:`explicit_run` writes a small Run holding exactly the numbers it is given, for
checks (search, projection, report) whose answer is worked out by hand.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from analysis.store.run import TABLE_COLUMNS, Run, write_run

BINS = 128
GROUP = 32
SYNTHETIC_NOTE = "synthetic: generated numbers, not a measurement"


CONV_ROLES, LINEAR_ROLES = ("conv1", "conv2"), ("attn", "proj", "fc1", "fc2")  # per residual block


def _layer_shapes(n: int, rng: np.random.Generator) -> list[tuple[str, str, int, int, int]]:
    """(name, type, out, K, spatial) per layer; spatial = output positions per sample. A third are convolutions
    in ResNet-like blocks of two (``features.B.conv1``), the rest Linear layers in transformer-like blocks of four
    (``blocks.B.attn``, ``.proj``, ``.fc1``, ``.fc2``)."""
    shapes = []
    n_conv = n // 3
    for i in range(n):
        if i < n_conv:
            cin = 3 if i == 0 else int(rng.choice([16, 32, 64, 128]))
            cout = int(rng.choice([16, 32, 64, 128]))
            name = f"features.{i // 2}.{CONV_ROLES[i % 2]}"
            shapes.append((name, "Conv2d", cout, cin * 9, int(rng.choice([64, 256, 1024]))))
        else:
            k = int(rng.choice([64, 128, 256, 512, 100]))  # 100: not a multiple of the int4 group
            j = i - n_conv
            out = int(rng.choice([64, 128, 256, 512]))
            shapes.append((f"blocks.{j // 4}.{LINEAR_ROLES[j % 4]}", "Linear", out, k, 1))
    return shapes


def _fed_by(names: list[str]) -> list[list[str]]:
    """Which layers feed each, as ``analysis.models.structure`` records a residual network: a block's first
    layer reads the residual stream (its two latest writers), its second the first; the second's output is
    added into the stream (``conv2``, ``proj``, ``fc2``)."""
    stream_raw: list[str] = []  # layers meeting in the stream now
    stream_last: list[str] = []  # the stream as a branch of the next sum: its latest writer
    out = []
    for i, name in enumerate(names):
        role = name.rsplit(".", 1)[1]
        if role in ("conv1", "attn", "fc1"):
            out.append(list(stream_raw))
        else:
            out.append([names[i - 1]])
            stream_raw, stream_last = [*stream_last, name], [name]
    return out


def _bytes(out: int, k: int) -> dict[str, int]:
    """Storage per format: weight codes + scales (+ zero points) + fp32 bias."""
    bias = 4 * out
    groups = out * (k // GROUP)
    return {
        "fp32": 4 * out * k + bias,
        "int8": out * k + 4 * out + bias + 4 + 1,  # per-channel scales, one activation scale + zero point
        "int4": math.ceil(out * k / 2) + 4 * groups + math.ceil(groups / 2) + bias,
    }


def _laplace_counts(lo: float, hi: float, b: float, total: int, relu: bool = False) -> list[int]:
    edges = np.linspace(lo, hi, BINS + 1)
    cdf = np.where(edges < 0, 0.5 * np.exp(edges / b), 1 - 0.5 * np.exp(-edges / b))
    p = np.diff(cdf)
    if relu:  # post-ReLU: half the mass sits at exactly zero, in the first bin
        p = np.where(edges[:-1] >= 0, p, 0.0)
        p[0] += 0.5
    p = p / p.sum()
    return np.round(p * total).astype(np.int64).tolist()


def _metric_of_loss(loss: np.ndarray | float, base_loss: float, base_metric: float) -> np.ndarray:
    """The generator's hidden loss -> accuracy relation (saturating)."""
    return base_metric - 0.8 * (1 - np.exp(-(np.asarray(loss) - base_loss) / 0.9))


def synthetic_run(path: str | os.PathLike, n_layers: int, seed: int = 0, *, n_random: int = 8,
                  overwrite: bool = False) -> Run:
    """Write a synthetic Run of ``n_layers`` layers at ``path`` and return it.

    Besides the baseline and the uniform formats, ``n_random`` mixed policies are "measured"
    (generated), as the engine's sweep measures random mixes to calibrate its projection.

    Example:
        >>> run = synthetic_run("/tmp/syn", 50, seed=1)  # doctest: +SKIP
        >>> run.meta["model"]["name"]                    # doctest: +SKIP
        'synthetic:50'
    """
    if n_layers < 1:
        raise ValueError(f"n_layers={n_layers} must be >= 1")
    rng = np.random.default_rng(seed)
    shapes = _layer_shapes(n_layers, rng)
    n_eval, base_loss, base_metric = 1000, 0.31, 0.925
    round_metric = lambda m: np.round(np.asarray(m) * n_eval) / n_eval  # noqa: E731  accuracy on n_eval samples

    weight = rng.lognormal(0.0, 1.0, n_layers)
    reaches = np.ones(n_layers, dtype=bool)
    if n_layers >= 20:
        reaches[rng.choice(n_layers, max(1, n_layers // 100), replace=False)] = False
    weight = np.where(reaches, weight, 0.0) / max(weight[reaches].sum(), 1e-12)
    delta = {"int8": 0.03 * weight * rng.uniform(0.7, 1.3, n_layers),
             "int4": 0.9 * weight * rng.uniform(0.7, 1.3, n_layers)}

    layers, sens, hists, clip, cost = [], [], [], [], []
    fed_by = _fed_by([s[0] for s in shapes])
    int4_ok = np.array([k % GROUP == 0 for (_, _, _, k, _) in shapes])
    for i, (name, typ, out, k, spatial) in enumerate(shapes):
        shape = f"{out}x{k // 9}x3x3" if typ == "Conv2d" else f"{out}x{k}"
        layers.append({"name": name, "type": typ, "order": i, "weight_shape": shape, "params": out * k + out,
                       "macs": out * k * spatial, "in_features": k, "out_features": out,
                       "reaches_output": bool(reaches[i]), "fed_by": json.dumps(fed_by[i])})
        w_b = float(rng.uniform(0.01, 0.05))
        w_absmax = w_b * float(rng.uniform(6, 10))
        a_hi = float(rng.uniform(2, 8))
        w_sqnr = {"int8": float(rng.uniform(38, 45)), "int4": float(rng.uniform(14, 20))}
        for fmt in ("int8", "int4"):
            if fmt == "int4" and not int4_ok[i]:
                sens.append({"layer": name, "format": fmt, "status": "skipped",
                             "reason": f"in_features={k} is not a multiple of group size {GROUP}", "metric": np.nan,
                             "metric_delta": np.nan, "loss": np.nan, "loss_delta": np.nan, "kl": np.nan,
                             "output_sqnr_db": np.nan, "weight_sqnr_db": np.nan})
                continue
            loss = base_loss + delta[fmt][i]
            metric = float(round_metric(_metric_of_loss(loss, base_loss, base_metric) + rng.normal(0, 0.001)))
            sens.append({"layer": name, "format": fmt, "status": "ok", "reason": "", "metric": metric,
                         "metric_delta": metric - base_metric, "loss": float(loss),
                         "loss_delta": float(delta[fmt][i]), "kl": float(delta[fmt][i] * 0.8),
                         "output_sqnr_db": float(w_sqnr[fmt] - rng.uniform(2, 6)) if reaches[i] else np.nan,
                         "weight_sqnr_db": w_sqnr[fmt]})
        for tensor, lo, hi, b, relu, total in (("weight", -w_absmax, w_absmax, w_b, False, out * k),
                                               ("input", 0.0, a_hi, a_hi / 6, True, 256 * k * spatial),
                                               ("output", 0.0, a_hi * 1.2, a_hi / 5, True, 256 * out * spatial)):
            counts = _laplace_counts(lo, hi, b, total, relu)
            hists.append({"layer": name, "tensor": tensor, "lo": lo, "hi": hi, "counts": counts,
                          "count": int(sum(counts)), "mean": float(b if relu else 0.0),
                          "std": float(b * math.sqrt(2)), "absmax": float(max(abs(lo), abs(hi)))})
        clip.append({"layer": name, "tensor": "weight", "format": "int8", "clip_lo": -w_absmax, "clip_hi": w_absmax,
                     "clipped_fraction": 0.0, "sqnr_db": w_sqnr["int8"]})
        if int4_ok[i]:
            clip.append({"layer": name, "tensor": "weight", "format": "int4", "clip_lo": -w_absmax,
                         "clip_hi": w_absmax, "clipped_fraction": 0.0, "sqnr_db": w_sqnr["int4"]})
        clip.append({"layer": name, "tensor": "input", "format": "int8", "clip_lo": 0.0, "clip_hi": a_hi,
                     "clipped_fraction": 0.0, "sqnr_db": float(rng.uniform(35, 42))})
        for fmt, nbytes in _bytes(out, k).items():
            if fmt == "int4" and not int4_ok[i]:
                continue
            cost.append({"layer": name, "format": fmt, "bytes": int(nbytes), "latency_ms": np.nan,
                         "latency_spread_ms": np.nan, "latency_source": ""})

    cost_df = pd.DataFrame(cost)
    fp32_layers = int(cost_df[cost_df.format == "fp32"]["bytes"].sum())
    other_bytes = int(fp32_layers * 0.04) // 4 * 4
    names = [s[0] for s in shapes]

    def measured(pol: dict[str, str]) -> tuple[float, float, float, int]:
        # layers interact: whole-model losses are a little super-additive in the single-layer ones
        extra = sum(delta[f][i] for i, n in enumerate(names) if (f := pol[n]) != "fp32")
        loss = base_loss + 1.15 * float(extra)
        metric = float(round_metric(_metric_of_loss(loss, base_loss, base_metric)))
        size = other_bytes + int(sum(_bytes(o, k)[pol[n]] for (n, _, o, k, _) in shapes))
        return loss, metric, 0.8 * (loss - base_loss), size

    def row(name: str, kind: str, pol: dict[str, str]) -> dict:
        loss, metric, kl, size = measured(pol)
        return {"name": name, "kind": kind, "layers_json": json.dumps(pol), "metric": metric, "loss": loss,
                "bytes": size, "latency_ms": np.nan, "measured_on": SYNTHETIC_NOTE, "projected_metric": np.nan,
                "projected_band": np.nan, "kl": kl}

    policy_rows = [{**row("fp32", "baseline", {n: "fp32" for n in names}), "layers_json": "{}"}]
    uniform = {}
    for fmt in ("int8", "int4"):
        allowed = int4_ok if fmt == "int4" else np.ones(n_layers, dtype=bool)
        pol = {n: (fmt if allowed[i] else "fp32") for i, n in enumerate(names)}
        policy_rows.append(row(f"uniform {fmt}", "uniform", pol))
        r = policy_rows[-1]
        uniform[fmt] = {"metric": r["metric"], "loss": r["loss"], "bytes": r["bytes"],
                        "skipped_layers": [n for n in names if pol[n] != fmt]}
    for j in range(n_random):
        choice = rng.integers(0, 3, n_layers)
        pol = {n: ("fp32", "int8", "int4" if int4_ok[i] else "fp32")[choice[i]] for i, n in enumerate(names)}
        policy_rows.append(row(f"random-{j + 1}", "random", pol))

    sha = hashlib.sha256(f"synthetic:{n_layers}:{seed}".encode()).hexdigest()
    meta = {
        "status": "complete", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "synthetic": True,
        "model": {"name": f"synthetic:{n_layers}", "kind": "torch", "source": SYNTHETIC_NOTE, "sha256": sha,
                  "params": int(sum(r["params"] for r in layers)), "fp32_bytes": other_bytes + fp32_layers,
                  "other_bytes": other_bytes},
        "data": {"task": "synthetic", "source": SYNTHETIC_NOTE, "sha256": hashlib.sha256(b"no data").hexdigest(),
                 "n_calib": 0, "n_eval": n_eval, "input_shape": [1, 3, 32, 32]},
        "metric": {"name": "accuracy", "higher_is_better": True, "loss": "cross_entropy", "unit": "fraction"},
        "formats": ["int8", "int4"], "format_specs": {}, "observer": "minmax",
        "baseline": {"metric": base_metric, "loss": base_loss, "bytes": other_bytes + fp32_layers},
        "uniform": uniform,
        "structure": {"source": "synthetic: generated residual blocks"},
        "sweep": {"path": "synthetic", "jobs": len(sens), "seconds": 0.0},
        "versions": {}, "seed": seed, "cpu": {},
    }
    tables = {"layers": pd.DataFrame(layers), "sensitivity": pd.DataFrame(sens), "histograms": pd.DataFrame(hists),
              "clipping": pd.DataFrame(clip), "cost": cost_df, "policies": pd.DataFrame(policy_rows)}
    return write_run(path, meta, tables, overwrite=overwrite)


def explicit_run(path: str | os.PathLike, layers: dict[str, dict[str, tuple[int, float, float]]], *,
                 baseline: tuple[float, float], measured: list[tuple[str, str, dict[str, str], float, float]] = (),
                 other_bytes: int = 0, higher_is_better: bool = True, overwrite: bool = False) -> Run:
    """A synthetic Run holding exactly the numbers given: for checks whose answer is worked out by hand.

    Args:
        layers: per layer, in execution order, ``{format: (bytes, loss_delta, metric)}``; ``"fp32"`` gives the
            layer's FP32 bytes (its other two numbers are ignored). A format a layer lacks is skipped for it.
        baseline: the FP32 model's ``(loss, metric)``.
        measured: whole-model policies as measured: ``(name, kind, {layer: format}, loss, metric)``; a kind
            of ``"random"`` switches the projection to its calibrated form.

    Example:
        >>> run = explicit_run("/tmp/x", {"a": {"fp32": (400, 0, 0), "int8": (100, 0.02, 0.89)}},
        ...                    baseline=(0.3, 0.9))  # doctest: +SKIP
    """
    base_loss, base_metric = baseline
    formats = [f for f in ("int8", "int4") if any(f in by_fmt for by_fmt in layers.values())]
    rows: dict[str, list[dict]] = {t: [] for t in ("layers", "sensitivity", "cost")}
    for i, (name, by_fmt) in enumerate(layers.items()):
        rows["layers"].append({"name": name, "type": "Linear", "order": i, "weight_shape": "", "params": 0,
                               "macs": 0, "in_features": 0, "out_features": 0, "reaches_output": True,
                               "input_group": name})
        for fmt in ("fp32", *formats):
            if fmt in by_fmt:
                rows["cost"].append({"layer": name, "format": fmt, "bytes": int(by_fmt[fmt][0]), "latency_ms": np.nan,
                                     "latency_spread_ms": np.nan, "latency_source": ""})
            if fmt == "fp32":
                continue
            _, delta, metric = by_fmt.get(fmt, (0, np.nan, np.nan))
            ok = fmt in by_fmt
            rows["sensitivity"].append({"layer": name, "format": fmt, "status": "ok" if ok else "skipped",
                                        "reason": "" if ok else "not given", "metric": metric,
                                        "metric_delta": metric - base_metric, "loss": base_loss + delta,
                                        "loss_delta": delta, "kl": delta, "output_sqnr_db": np.nan,
                                        "weight_sqnr_db": np.nan})

    def size(pol: dict[str, str]) -> int:
        return other_bytes + sum(by_fmt[pol.get(n, "fp32")][0] for n, by_fmt in layers.items())

    policies = [("fp32", "baseline", {}, base_loss, base_metric), *measured]
    policy_rows = [{"name": n, "kind": kind, "layers_json": json.dumps(pol), "metric": metric, "loss": loss,
                    "bytes": size(pol), "latency_ms": np.nan, "measured_on": SYNTHETIC_NOTE,
                    "projected_metric": np.nan, "projected_band": np.nan, "kl": loss - base_loss}
                   for n, kind, pol, loss, metric in policies]
    fp32_bytes = size({})
    sha = hashlib.sha256(json.dumps([layers, baseline, list(measured)], sort_keys=True).encode()).hexdigest()
    meta = {
        "status": "complete", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "synthetic": True,
        "model": {"name": f"synthetic:{len(layers)}", "kind": "torch", "source": SYNTHETIC_NOTE, "sha256": sha,
                  "params": 0, "fp32_bytes": fp32_bytes, "other_bytes": other_bytes},
        "data": {"task": "synthetic", "source": SYNTHETIC_NOTE, "n_calib": 0, "n_eval": 0},
        "metric": {"name": "accuracy" if higher_is_better else "error", "higher_is_better": higher_is_better,
                   "loss": "cross_entropy", "unit": "fraction"},
        "formats": formats, "format_specs": {},
        "baseline": {"metric": base_metric, "loss": base_loss, "bytes": fp32_bytes},
        "uniform": {}, "sweep": {"path": "synthetic", "jobs": len(rows["sensitivity"]), "seconds": 0.0},
        "versions": {}, "seed": 0, "cpu": {},
    }
    empty = {t: pd.DataFrame(columns=TABLE_COLUMNS[t]) for t in ("histograms", "clipping")}
    tables = {"layers": pd.DataFrame(rows["layers"]), "sensitivity": pd.DataFrame(rows["sensitivity"]),
              "cost": pd.DataFrame(rows["cost"]), "policies": pd.DataFrame(policy_rows), **empty}
    return write_run(path, meta, tables, overwrite=overwrite)
