"""Projection v1: metric, size and latency of any policy from a Run's per-layer measurements.

* **Loss** is additive: ``baseline loss + sum of loss_delta[layer, format]`` over the
  quantized layers (each delta measured with only that layer quantized).
* **Metric** comes from the loss through a monotone map fitted (isotonic regression,
  then linear interpolation) through every measured (loss, metric) point of the Run:
  the baseline, every single-layer job in ``sensitivity`` and every measured
  whole-model policy in ``policies``. Beyond the largest measured loss the map goes on
  along the chord of the fit (first to last point), and the projection says it was
  extrapolated.
* **Band**: each measured whole-model policy (other than the baseline) is projected
  with a map fitted without its own point; the band is the largest
  ``|projected - measured|`` among them. ``band_method`` says how it was computed.
* **Size** is exact: ``other_bytes + sum of bytes[layer, format]`` from ``cost``.
* **Latency** only where every needed per-layer latency is measured and the Run holds
  the FP32 end-to-end latency (``run.json`` ``latency.fp32_ms``):
  ``fp32_ms + sum of (latency[layer, format] - latency[layer, fp32])``; otherwise ``None``.

A :class:`Projector` precomputes arrays once; projecting a policy (codes per layer in
execution order: ``fp32=0, int8=1, int4=2, int8-dyn=3``) is O(layers) numpy. The arrays have a
column per policy format; a format the Run did not measure is allowed for no layer.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from analysis.project.curve import LossToMetric, isotonic  # noqa: F401 - isotonic is part of this module's API
from analysis.store.policy import FORMAT_CODE, POLICY_FORMATS
from analysis.store.run import Run


@dataclass(frozen=True)
class Projection:
    metric: float
    band: float | None  # +/- on metric; None when no measured policy could validate it
    loss: float
    bytes: int
    size_ratio: float  # fp32 bytes / projected bytes
    latency_ms: float | None
    extrapolated: bool  # projected loss beyond the largest measured loss
    nearest: str = ""  # calibrated projections: the closest measured whole-model policy
    distance: float = 0.0  # share of layers whose format differs from that policy


@dataclass(frozen=True)
class Validation:
    """One measured whole-model policy and what the projection said for it."""

    name: str
    measured_metric: float
    projected_metric: float
    error: float
    held_out: bool  # its own point was left out of the loss -> metric map


# the range each built-in metric can take: projections never leave it (a Run may name its own in run.json)
METRIC_RANGES = {"accuracy": (0.0, 1.0), "agreement": (0.0, 1.0), "cosine": (-1.0, 1.0), "embedding": (-1.0, 1.0),
                 "next_token_agreement": (0.0, 1.0), "nmse": (0.0, float("inf")), "perplexity": (1.0, float("inf"))}
RUNTIME_PREFIX = "onnxruntime"  # measured_on of a policy measured in the runtime (verify), not the engine


def is_runtime_row(row) -> bool:
    """Whether a policies-table row was measured in onnxruntime (``verify``) rather than by the sweep's fake-quant."""
    return str(getattr(row, "measured_on", "") or "").startswith(RUNTIME_PREFIX)


class Projector:
    """Per-layer arrays of one Run, ready to project any policy fast."""

    def __init__(self, run: Run) -> None:
        self.names = run.layer_names
        index = {n: i for i, n in enumerate(self.names)}
        n, nf = len(self.names), len(POLICY_FORMATS)
        # what a policy may choose from: fp32 and the formats the Run measured, in code order
        self.formats = [f for f in POLICY_FORMATS if f == "fp32" or f in run.formats]
        # formats whose input quantizer is calibrated once per tensor: layers reading one tensor share it
        specs = run.meta.get("format_specs") or {"int8": {"activation": {"dynamic": False}}}
        self.shared_input_codes = sorted(FORMAT_CODE[f] for f, spec in specs.items() if f in FORMAT_CODE
                                         and (spec or {}).get("activation") and not spec["activation"].get("dynamic"))
        self.higher_is_better = run.higher_is_better
        metric = run.meta.get("metric", {})
        rng = metric.get("range") or METRIC_RANGES.get(metric.get("name"))
        self.metric_range = (float(rng[0]), float(rng[1])) if rng else None
        self.base_loss = float(run.meta["baseline"]["loss"])
        self.base_metric = float(run.meta["baseline"]["metric"])
        self.other_bytes = int(run.meta["model"].get("other_bytes", 0))

        self.loss_delta = np.zeros((n, nf))
        self.allowed = np.zeros((n, nf), dtype=bool)
        self.allowed[:, 0] = True
        self.bytes = np.zeros((n, nf), dtype=np.int64)
        self.latency = np.full((n, nf), np.nan)
        self.reasons: dict[tuple[int, int], str] = {}

        sens = run.sensitivity
        rows = sens[sens["format"].isin(POLICY_FORMATS)]
        for r in rows.itertuples(index=False):
            i, f = index.get(r.layer), FORMAT_CODE[r.format]
            if i is None:
                continue
            if r.status == "ok" and math.isfinite(r.loss_delta):
                self.loss_delta[i, f] = r.loss_delta
                self.allowed[i, f] = True
            else:
                self.reasons[(i, f)] = str(r.reason or "skipped in the sweep")
        cost = run.cost[run.cost["format"].isin(POLICY_FORMATS)]
        have_bytes = np.zeros((n, nf), dtype=bool)
        for r in cost.itertuples(index=False):
            i, f = index.get(r.layer), FORMAT_CODE[r.format]
            if i is None:
                continue
            self.bytes[i, f] = int(r.bytes)
            have_bytes[i, f] = True
            self.latency[i, f] = r.latency_ms
        for i, f in zip(*np.nonzero(self.allowed & ~have_bytes)):
            self.reasons[(int(i), int(f))] = "no size measured for this format"
        self.allowed &= have_bytes
        self.fp32_bytes = int(self.other_bytes + self.bytes[:, 0].sum())
        self.rows = np.arange(n)
        lat = run.meta.get("latency")
        fp32_ms = lat.get("fp32_ms") if isinstance(lat, dict) else None
        self.fp32_latency_ms = float(fp32_ms) if isinstance(fp32_ms, (int, float)) else None

        # measured (loss, metric) points: baseline, single-layer jobs, whole-model policies
        ok = rows[rows["status"] == "ok"]
        pts_loss = [self.base_loss, *ok["loss"].astype(float).tolist()]
        pts_metric = [self.base_metric, *ok["metric"].astype(float).tolist()]
        self.measured_policies: list[tuple[str, np.ndarray, float, float]] = []
        pol = run.policies
        for r in pol.itertuples(index=False):
            if not (np.isfinite(r.metric) and np.isfinite(r.loss)):
                continue
            pts_loss.append(float(r.loss))
            pts_metric.append(float(r.metric))
            if r.kind == "baseline":
                continue
            codes = self.codes_of(r.layers_json, index)
            if codes is not None:
                self.measured_policies.append((str(r.name), codes, float(r.metric), float(r.loss)))
        self.pts_loss, self.pts_metric = np.array(pts_loss), np.array(pts_metric)
        self.map = LossToMetric(self.pts_loss, self.pts_metric, self.higher_is_better, self.metric_range)
        self.validations, self.band, self.band_method = self._validate()
        # projection v2 where the sweep measured random mixed policies (see analysis.project.calibration)
        self.calibration = self._calibrated(run, index)
        self.penalty = self.loss_delta
        if self.calibration is not None:
            self.penalty = self.calibration.penalty
            self.validations, self.band = self.calibration.validations, self.calibration.band
            self.band_method = self.calibration.method()

    def _calibrated(self, run: Run, index: dict[str, int]):
        from analysis.project.calibration import MIN_POLICIES, Calibration, penalty_array

        pol = run.policies
        if "random" not in set(pol["kind"]):
            return None
        sens = run.sensitivity
        ok = sens[(sens["status"] == "ok") & sens["format"].isin(POLICY_FORMATS)]
        # KL to the FP32 outputs for class scores; for embeddings and other outputs the loss (e.g. the
        # normalised squared error, which 1 - cosine tracks) adds up across layers more faithfully
        classifier = run.meta.get("metric", {}).get("name") in ("accuracy", "agreement")
        use_kl = classifier and "kl" in pol.columns and bool(np.isfinite(ok["kl"]).all()) and len(ok) > 0
        # The runtime is the ground truth: where enough whole-model policies were measured in onnxruntime
        # (verify rows: analyze verifies the uniform and some random policies, users verify more), the map
        # and its band are fitted to those; otherwise to the policies the sweep measured with its own
        # fake-quant, and the projection says it is the engine's.
        runtime = [r for r in pol.itertuples(index=False) if is_runtime_row(r)]
        engine = [r for r in pol.itertuples(index=False) if r.kind in ("uniform", "random") and not is_runtime_row(r)]
        for rows, source in ((runtime, "onnxruntime"), (engine, "engine")):
            measured = []
            for r in rows:
                if not np.isfinite(r.metric):
                    continue
                pen = float(getattr(r, "kl", np.nan)) if use_kl else max(float(r.loss) - self.base_loss, 0.0)
                codes = self.codes_of(r.layers_json, index)
                if codes is not None and np.isfinite(pen) and codes.any():
                    measured.append((str(r.name), codes, float(r.metric), pen))
            if len(measured) >= MIN_POLICIES:
                break
        if len(measured) < MIN_POLICIES:
            return None
        penalty = penalty_array(ok, index, len(POLICY_FORMATS), FORMAT_CODE, use_kl)
        single_pen = ok["kl"].to_numpy(float) if use_kl else np.clip(ok["loss_delta"].to_numpy(float), 0, None)
        return Calibration(penalty, self.base_metric, single_pen, ok["metric"].to_numpy(float), measured,
                           self.higher_is_better, "kl" if use_kl else "loss", source, self.metric_range)

    def metric_of_penalty(self, penalty_sum: float) -> float:
        """Projected metric for a summed per-layer ``penalty`` (monotone: more penalty never helps)."""
        if self.calibration is not None:
            return self.calibration.map(penalty_sum)
        return self.map(self.base_loss + penalty_sum)

    @staticmethod
    def codes_of(layers_json: str, index: dict[str, int]) -> np.ndarray | None:
        """Format codes (execution order) of a policies-table row, or None if it names an unknown layer or format."""
        try:
            layers = json.loads(layers_json) if layers_json else {}
        except (TypeError, json.JSONDecodeError):
            return None
        codes = np.zeros(len(index), dtype=np.int8)
        for name, fmt in layers.items():
            if name not in index or fmt not in FORMAT_CODE:
                return None
            codes[index[name]] = FORMAT_CODE[fmt]
        return codes

    def _validate(self) -> tuple[list[Validation], float | None, str]:
        out = []
        for name, codes, measured, loss in self.measured_policies:
            keep = ~((self.pts_loss == loss) & (self.pts_metric == measured))
            keep[0] = True  # the baseline anchors every fit
            held_out = bool((~keep).any()) and int(keep.sum()) >= 2
            fit = (LossToMetric(self.pts_loss[keep], self.pts_metric[keep], self.higher_is_better, self.metric_range)
                   if held_out else self.map)
            projected = fit(self.loss(codes))
            out.append(Validation(name, measured, projected, projected - measured, held_out))
        if not out:
            return out, None, ("no measured whole-model policy in this Run to validate against: "
                               "the error of the projection is unknown")
        band = max(abs(v.error) for v in out)
        names = ", ".join(v.name for v in out)
        how = ("each projected with a loss→metric map fitted without its own point"
               if all(v.held_out for v in out) else "projected with the full map (some could not be held out)")
        return out, band, (f"largest |projected − measured| over {len(out)} measured whole-model "
                           f"polic{'y' if len(out) == 1 else 'ies'} ({names}), {how}")

    def loss(self, codes: np.ndarray) -> float:
        return self.base_loss + float(self.loss_delta[self.rows, codes].sum())

    def size(self, codes: np.ndarray) -> int:
        return int(self.other_bytes + self.bytes[self.rows, codes].sum())

    def latency_ms(self, codes: np.ndarray) -> float | None:
        if self.fp32_latency_ms is None:
            return None
        q = codes != 0
        chosen, fp32 = self.latency[self.rows[q], codes[q]], self.latency[self.rows[q], 0]
        if not (np.isfinite(chosen).all() and np.isfinite(fp32).all()):
            return None
        return self.fp32_latency_ms + float((chosen - fp32).sum())

    def project(self, codes: np.ndarray) -> Projection:
        """Projected metric (± band), exact size and latency (when measured) of ``codes``."""
        codes = np.asarray(codes, dtype=np.intp)
        loss = self.loss(codes)
        size = self.size(codes)
        if self.calibration is not None:
            cal = self.calibration
            total = cal.sum(codes)
            nearest, distance = cal.nearest(codes)
            return Projection(metric=cal.map(total), band=self.band, loss=loss, bytes=size,
                              size_ratio=self.fp32_bytes / size if size else math.inf,
                              latency_ms=self.latency_ms(codes), extrapolated=cal.map.a * total > cal.map.max_penalty + 1e-15,
                              nearest=nearest, distance=distance)
        return Projection(metric=self.map(loss), band=self.band, loss=loss, bytes=size,
                          size_ratio=self.fp32_bytes / size if size else math.inf,
                          latency_ms=self.latency_ms(codes), extrapolated=loss > self.map.max_loss + 1e-12)

    def sanitize(self, codes: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Codes with every unavailable (layer, format) set to fp32, and one reason per change."""
        codes = np.asarray(codes, dtype=np.int8).copy()
        bad = ~self.allowed[self.rows, codes]
        notes = []
        for i in np.nonzero(bad)[0]:
            f = int(codes[i])
            notes.append(f"{self.names[i]}: {POLICY_FORMATS[f]} not available "
                         f"({self.reasons.get((int(i), f), 'not measured')}); kept at fp32")
            codes[i] = 0
        return codes, notes
