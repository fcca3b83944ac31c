"use strict";
// QuantLens report: in-page what-if. No framework, no network; every Run string reaches the
// page through textContent or Plotly text already escaped by analysis/report/render.py and figures.py.

// ---- The projection: the same formula as analysis/project/projection.py ---------------------
// The arrays come from analysis.report.render.projection_model(); keep the two in step.
//   s      = offset + scale * sum_i penalty[i][code_i]
//            (v2: offset 0, scale a, penalty per analysis/project/calibration.py; v1: baseline loss, 1, Δloss)
//   metric = curve(s): linear interpolation through (knots_x, knots_y), clamped on the left,
//            continued with tail_slope beyond the last knot ("extrapolated")
//   bytes  = other_bytes + sum_i bytes[i][code_i]
//   ms     = fp32_latency_ms + sum over quantized i of (latency[i][c] - latency[i][0]), or null
//   nearest: the measured whole-model policy (FP32 included) with the fewest layers in another format
function qlCurve(m, s) {
  const x = m.knots_x, y = m.knots_y, n = x.length;
  if (s > x[n - 1]) {  // the tail stops at the metric's own range, as in analysis/project/curve.py
    const t = y[n - 1] + m.tail_slope * (s - x[n - 1]), r = m.metric_range;
    return r ? Math.min(Math.max(t, r[0] ?? -Infinity), r[1] ?? Infinity) : t;  // JSON writes an open end as null
  }
  if (s <= x[0]) return y[0];
  let lo = 0, hi = n - 1;
  while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (x[mid] <= s) lo = mid; else hi = mid; }
  return (y[hi] - y[lo]) / (x[hi] - x[lo]) * (s - x[lo]) + y[lo];
}

function qlProject(m, codes) {
  let pen = 0, bytes = 0, dlat = 0, latOk = m.fp32_latency_ms !== null;
  for (let i = 0; i < codes.length; i++) {
    const c = codes[i];
    pen += m.penalty[i][c];
    bytes += m.bytes[i][c];
    if (latOk && c !== 0) {
      const a = m.latency[i][c], b = m.latency[i][0];
      if (a === null || b === null) latOk = false; else dlat += a - b;
    }
  }
  const s = m.offset + m.scale * pen, total = m.other_bytes + bytes;
  // as Calibration.nearest: the FP32 baseline first, then the first measured policy that is strictly closer
  let nearest = "", distance = 0;
  if (m.measured.length) {
    nearest = "fp32";
    distance = codes.reduce((n, c) => n + (c !== 0), 0) / codes.length;
    m.measured.forEach((p) => {
      const d = p.codes.reduce((n, c, i) => n + (c !== codes[i]), 0) / codes.length;
      if (d < distance) { nearest = p.name; distance = d; }
    });
  }
  return {metric: qlCurve(m, s), band: m.band, s: s, bytes: total,
          size_ratio: total ? m.fp32_bytes / total : Infinity,
          latency_ms: latOk ? m.fp32_latency_ms + dlat : null,
          extrapolated: s > m.knots_x[m.knots_x.length - 1] + m.extrapolation_eps,
          nearest: nearest, distance: distance};
}

if (typeof module !== "undefined") module.exports = {qlProject, qlCurve};

// ---- The page ---------------------------------------------------------------------------------
function qlInit() {
  const data = JSON.parse(document.getElementById("ql-data").textContent);
  const m = data.model, fmts = data.formats;  // fmts[code]; data.offered: the codes the Run measured
  const selects = Array.from(document.querySelectorAll("select.ql-fmt"));
  const plotConfig = {displaylogo: false, responsive: true, showLink: false, showSendToCloud: false,
                      modeBarButtonsToRemove: ["sendDataToCloud"]};
  for (const [id, fig] of Object.entries(data.figures)) {
    const el = document.getElementById(id);
    if (el && window.Plotly) Plotly.newPlot(el, fig.data, fig.layout, plotConfig);
  }
  const fmtMetric = (x, signed) => {
    if (x === null || !isFinite(x)) return "—";
    const sign = signed && x >= 0 ? "+" : "";
    return data.pct ? sign + (x * 100).toFixed(2) + (signed ? " pp" : " %") : sign + x.toFixed(4);
  };
  const fmtMB = (b) => (b / 1e6).toFixed(3) + " MB";
  const set = (id, text) => { document.getElementById(id).textContent = text; };

  function codes() { return selects.map((s) => fmts.indexOf(s.value)); }

  function update() {
    const c = codes(), p = qlProject(m, c);
    const band = p.band === null ? "error unknown" : "± " + fmtMetric(p.band, true).replace("+", "");
    set("ql-metric", fmtMetric(p.metric, false));
    set("ql-band", band + (p.extrapolated ? " · extrapolated beyond every measured point" : ""));
    set("ql-nearest", p.nearest ? "nearest measured policy: " + p.nearest + " (" +
        Math.round(p.distance * 100) + " % of layers differ)" : "");
    set("ql-delta", fmtMetric(p.metric - data.baseline_metric, true) + " vs FP32");
    set("ql-size", fmtMB(p.bytes));
    set("ql-bytes", p.bytes.toLocaleString("en-US") + " B · " + p.size_ratio.toFixed(2) + "× smaller than FP32");
    set("ql-latency", p.latency_ms === null ? "not measured" : p.latency_ms.toFixed(2) + " ms");
    const counts = fmts.map(() => 0);
    c.forEach((k) => counts[k]++);
    set("ql-count", (c.length - counts[0]) + " / " + c.length);
    set("ql-mix", data.offered.map((k) => fmts[k].toUpperCase() + " " + counts[k]).join(" · "));
    const changed = c.filter((k, i) => k !== data.chosen[i]).length;
    set("ql-changed", changed ? changed + " layer(s) changed from the chosen policy" : "the chosen policy");
    selects.forEach((s, i) => {
      s.closest("tr").classList.toggle("ql-edited", c[i] !== data.chosen[i]);
      const cell = document.getElementById("ql-kb-" + i);
      if (cell) cell.textContent = (m.bytes[i][c[i]] / 1e3).toFixed(1);
    });
    const layers = {};
    data.layers.forEach((n, i) => { layers[n] = fmts[c[i]]; });
    set("ql-policy-json", JSON.stringify({schema: "quantlens.policy/1", model: {sha256: data.sha256},
                                          default: "fp32", layers: layers}, null, 2));
    const fr = document.getElementById("fig-frontier");
    if (fr && window.Plotly && data.current_trace !== null) {
      Plotly.restyle(fr, {x: [[p.bytes / 1e6]], y: [[p.metric]]}, [data.current_trace]);
    }
  }

  function apply(target) {  // target: a code per layer, or one code for every layer that allows it
    selects.forEach((s, i) => {
      const k = Array.isArray(target) ? target[i] : target;
      s.value = m.allowed[i][k] ? fmts[k] : "fp32";
    });
    update();
  }

  selects.forEach((s) => s.addEventListener("change", update));
  document.getElementById("ql-reset").addEventListener("click", () => apply(data.chosen));
  document.querySelectorAll("button[data-all]").forEach((b) =>
    b.addEventListener("click", () => apply(fmts.indexOf(b.dataset.all))));
  update();
  document.body.dataset.ready = "1";
}

if (typeof document !== "undefined") {
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", qlInit);
  else qlInit();
}
