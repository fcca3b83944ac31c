"""Build a Run's tables from the engine's measurements (plain records in, DataFrames out)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.engine.plan import SweepPlan
from analysis.quant.sizes import policy_bytes
from analysis.models.base import LayerInfo
from analysis.models.structure import Structure
from analysis.quant.primitives import sqnr_db

SENS_NUMBERS = ("metric", "metric_delta", "loss", "loss_delta", "kl", "output_sqnr_db", "weight_sqnr_db")
NONFINITE = "nonfinite"  # sensitivity status of a job whose quantized output held NaN or Inf


def nonfinite_reason(rec: dict) -> str | None:
    """Why a job's numbers are not usable, or None: its output held NaN/Inf (counted by the sweep, or seen
    as a non-finite loss where a backend does not count). A metric such as accuracy still comes out as a
    number then (argmax of NaN), so it is recorded as NaN rather than trusted."""
    n = int(rec.get("nonfinite") or 0)
    loss = rec["result"].get("loss")
    if n == 0 and (loss is None or math.isfinite(loss)):
        return None
    where = f"on {n} sample(s)" if n else "(non-finite loss)"
    return f"the quantized model's output held NaN or Inf {where}"


def layers_table(layers: list[LayerInfo], reaches: dict[str, bool],
                 fed_by: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """One row per layer; ``fed_by`` (the layers feeding each, a JSON list) when the model's graph was read."""
    df = pd.DataFrame([{"name": l.name, "type": l.type, "order": l.order, "weight_shape": l.weight_shape_str,
                        "params": l.params, "macs": l.macs, "in_features": l.in_features,
                        "out_features": l.out_features, "reaches_output": bool(reaches[l.name]),
                        "input_group": l.input_group or l.name} for l in layers])
    if fed_by is not None:
        df["fed_by"] = [json.dumps(fed_by.get(l.name, [])) for l in layers]
    return df


def sensitivity_table(layers: list[LayerInfo], formats: list[str], skip: dict[tuple[str, str], str],
                      records: dict[tuple[str, str], dict], baseline: dict, weight_sqnr: dict[tuple[str, str], float]) -> pd.DataFrame:
    """One row per layer x format, in execution order. Jobs not finished yet are ``pending``."""
    rows = []
    for l in layers:
        for f in formats:
            row = {"layer": l.name, "format": f, **{k: np.nan for k in SENS_NUMBERS}}
            if (l.name, f) in skip:
                row.update(status="skipped", reason=skip[(l.name, f)])
            elif (l.name, f) not in records:
                row.update(status="pending", reason="not measured yet")
            else:
                rec = records[(l.name, f)]
                r = rec["result"]
                row.update(status="ok", reason="", metric=r["metric"], metric_delta=r["metric"] - baseline["metric"],
                           loss=r["loss"], loss_delta=r["loss"] - baseline["loss"], kl=r["kl"],
                           output_sqnr_db=sqnr_db(rec["signal"], rec["noise"]), weight_sqnr_db=weight_sqnr[(l.name, f)])
                row.update({k: v for k, v in r.items() if k not in ("metric", "loss", "kl")})  # extra metrics
                if (why := nonfinite_reason(rec)) is not None:
                    row.update(status=NONFINITE, reason=why, metric=np.nan, metric_delta=np.nan)
            rows.append(row)
    return pd.DataFrame(rows)


def policies_table(baseline: dict, policy_records: dict[str, dict], policies: dict[str, dict[str, str]],
                   cost: pd.DataFrame, other_bytes: int, measured_on: str, kinds: dict[str, str]) -> pd.DataFrame:
    """The baseline plus every measured whole-model policy (uniform formats, random mixes)."""
    fp32 = policy_bytes(cost, {}, other_bytes)
    rows = [{"name": "fp32", "kind": "baseline", "layers_json": "{}", "metric": baseline["metric"],
             "loss": baseline["loss"], "bytes": fp32, "latency_ms": np.nan, "measured_on": measured_on,
             "projected_metric": np.nan, "projected_band": np.nan, "kl": 0.0}]
    for name, pol in policies.items():
        rec = policy_records.get(name)
        if rec is None:
            continue
        r = rec["result"]
        rows.append({"name": name, "kind": kinds.get(name, "uniform"), "layers_json": json.dumps(pol, sort_keys=True),
                     "metric": np.nan if nonfinite_reason(rec) else r["metric"], "loss": r["loss"], "bytes": policy_bytes(cost, pol, other_bytes),
                     "latency_ms": np.nan, "measured_on": measured_on, "projected_metric": np.nan, "projected_band": np.nan,
                     "kl": r.get("kl", np.nan),
                     **{k: v for k, v in r.items() if k not in ("metric", "loss", "kl")}})  # extra metrics
    return pd.DataFrame(rows)


def finite_or_none(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


@dataclass
class RunTables:
    """A sweep's tables: those known before any job runs, and the two rebuilt from the finished
    job records (``sensitivity`` and ``policies``) each time a chunk comes back."""

    plan: SweepPlan
    formats: list[str]
    baseline: dict
    reaches: dict[str, bool]
    weight_sqnr: dict[tuple[str, str], float]
    histograms: pd.DataFrame
    clipping: pd.DataFrame
    cost: pd.DataFrame
    other_bytes: int
    measured_on: str
    channels: pd.DataFrame | None = None  # per-output-channel weight statistics (analysis.engine.channels)
    structure: Structure | None = None  # which layers feed each (models.structure); None: not read

    def build(self, done: dict[str, dict]) -> dict[str, pd.DataFrame]:
        """Every table of the Run with the records in ``done`` (by job key); the rest are pending."""
        plan = self.plan
        by_layer = {(j.layer, j.format): done[j.key] for j in plan.jobs if j.is_layer and j.key in done}
        by_policy = {j.policy_name: done[j.key] for j in plan.jobs if not j.is_layer and j.key in done}
        tables = {"layers": layers_table(plan.layers, self.reaches, self.structure.fed_by if self.structure else None),
                  "sensitivity": sensitivity_table(plan.layers, self.formats, plan.skip, by_layer, self.baseline,
                                                   self.weight_sqnr),
                  "histograms": self.histograms, "clipping": self.clipping, "cost": self.cost,
                  "policies": policies_table(self.baseline, by_policy, plan.policies, self.cost, self.other_bytes,
                                             self.measured_on, plan.kinds)}
        if self.channels is not None:
            tables["channels"] = self.channels
        return tables
