"""The self-contained HTML report and a Markdown summary of a Run.

``render_html`` writes one page that opens offline: plotly.js is inlined, the page's CSP
forbids every request, and the figures are plain JSON drawn by the page. A reader toggles
layers in the page and sees projected metric, size and latency recomputed in JavaScript
with the formula of ``analysis.project.projection`` (``template.js``: ``qlProject``) from
the arrays :func:`projection_model` exports. Every string from the Run is escaped: HTML
text through ``html.escape``, data through JSON with ``<``, ``>`` and ``&`` as ``\\u`` escapes.

Example:
    >>> run = load_run("runs/digits")
    >>> write_report(run, "report.html")              # the best known policy
    >>> write_report(run, "pr.md", fmt="md", policy=from_json(open("p.json").read()))
"""
from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from analysis.errors import InputError
from analysis.project.projection import Projection, Projector
from analysis.report.content import ReportContent, build_content
from analysis.report.figures import figures
from analysis.store.atomic import write_text_atomic
from analysis.store.channels import has_channels
from analysis.store.policy import FORMAT_CODE, POLICY_FORMATS, Policy
from analysis.store.run import Run

HERE = Path(__file__).parent
REPORT_FORMATS = ("html", "md")
TOP_SENSITIVE = 4


class ReportError(InputError):
    """A report that cannot be written; the message names the file or option."""


# ---- what the page's JavaScript projects with ----------------------------------------------------

def _nums(a) -> list:
    """Nested lists of floats with None for NaN/inf (JSON has no NaN)."""
    arr = np.asarray(a, dtype=float)
    return [_nums(r) for r in arr] if arr.ndim > 1 else [float(v) if math.isfinite(v) else None for v in arr]


def projection_model(p: Projector) -> dict:
    """The per-layer arrays and the curve behind ``qlProject`` (template.js): the one place that
    says how ``analysis.project.projection`` maps a policy to a metric, in data the page can read.

    ``metric = curve(offset + scale * sum of penalty[layer, format])``, the curve linear between knots.
    v2 (calibrated): offset 0, scale ``a``, the penalty and ``g`` of ``analysis.project.calibration``.
    v1: offset = baseline loss, scale 1, penalty = measured loss change, curve = the loss -> metric map.
    """
    cal = getattr(p, "calibration", None)
    if cal is not None:
        offset, scale, penalty, curve, eps = 0.0, cal.map.a, cal.penalty, cal.map.g, 1e-15
        measured = [{"name": n, "codes": np.asarray(c).astype(int).tolist()} for n, c in zip(cal.names, cal.codes)]
    else:
        offset, scale, penalty, curve, eps = p.base_loss, 1.0, p.loss_delta, p.map, 1e-12
        measured = []
    return {"offset": float(offset), "scale": float(scale), "penalty": _nums(penalty),
            "allowed": p.allowed.tolist(), "bytes": p.bytes.astype(int).tolist(), "latency": _nums(p.latency),
            "other_bytes": int(p.other_bytes), "fp32_bytes": int(p.fp32_bytes),
            "fp32_latency_ms": p.fp32_latency_ms, "knots_x": _nums(curve.x), "knots_y": _nums(curve.y),
            "tail_slope": float(curve.tail_slope), "extrapolation_eps": eps, "band": p.band, "measured": measured,
            "metric_range": list(curve.bounds) if curve.bounds is not None else None}


def most_sensitive(run: Run, k: int = TOP_SENSITIVE) -> list[str]:
    """The ``k`` layers with the largest KL to FP32 at any format (|Δloss| where KL is missing)."""
    s = run.sensitivity[run.sensitivity["status"] == "ok"]
    if s.empty:
        return []
    score = s["kl"].where(s["kl"].notna(), s["loss_delta"].abs()).fillna(0.0)
    return s.assign(score=score).groupby("layer")["score"].max().sort_values(ascending=False).head(k).index.tolist()


def fmt_metric(x: float | None, run: Run, signed: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    if run.meta["metric"].get("name") in ("accuracy", "agreement"):
        return f"{x * 100:+.2f} pp" if signed else f"{x * 100:.2f} %"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def fmt_band(band: float | None, run: Run) -> str:
    return "error unknown" if band is None else "± " + fmt_metric(band, run, signed=True).lstrip("+")


def uniform_rows(run: Run) -> list[dict]:
    """FP32 and each uniform format: measured metric, loss, bytes, layers kept FP32."""
    m = run.meta
    rows = [{"policy": "fp32", "metric": m["baseline"]["metric"], "loss": m["baseline"]["loss"],
             "bytes": m["baseline"].get("bytes", m["model"].get("fp32_bytes")), "kept": []}]
    uni = m.get("uniform") or {}
    for fmt in sorted(uni, key=lambda f: (POLICY_FORMATS.index(f) if f in POLICY_FORMATS else 9, f)):
        u = uni[fmt]
        rows.append({"policy": f"all-{fmt}", "metric": u.get("metric"), "loss": u.get("loss"),
                     "bytes": u.get("bytes"), "kept": list(u.get("skipped_layers") or [])})
    return rows


# ---- HTML -----------------------------------------------------------------------------------

def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _finite(obj):
    """``obj`` with NaN and infinities as None (JSON has neither), numpy scalars as Python ones."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _script_json(obj) -> str:
    """JSON safe inside <script>: no '<', '>', '&' or line separators can close or confuse it."""
    s = json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


def _table(head: list[str], rows: list[list[str]], num: set[int] = frozenset(), attrs: str = "") -> str:
    """Cells are already-escaped HTML fragments."""
    th = "".join(f'<th class="num">{h}</th>' if i in num else f"<th>{h}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in num else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table{attrs}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _provenance(run: Run) -> str:
    m = run.meta
    model, data, metric = m["model"], m.get("data", {}), m["metric"]
    items = [("Model", f"{_e(model.get('name'))} ({_e(model.get('kind'))}, {int(model.get('params', 0)):,} parameters, "
                       f"{len(run.layer_names)} quantizable layers)"),
             ("Model source", _e(model.get("source"))), ("Model sha256", f"<code>{_e(model.get('sha256'))}</code>"),
             ("Task", f"{_e(data.get('task'))} — {_e(data.get('source'))}"),
             ("Data sha256", f"<code>{_e(data.get('sha256'))}</code>"),
             ("Samples", f"{_e(data.get('n_calib'))} calibration, {_e(data.get('n_eval'))} evaluation"),
             ("Metric", f"{_e(metric.get('name'))} ({'higher' if metric.get('higher_is_better') else 'lower'} is better; "
                        f"{_e(metric.get('description', ''))}), loss {_e(metric.get('loss'))}"),
             *_judged(model, metric),
             ("Formats", "; ".join(f"<b>{_e(f)}</b>: {_e(m.get('format_specs', {}).get(f, {}).get('description', ''))}"
                                   for f in run.formats)),
             ("Sweep", f"{_e(m.get('sweep', {}).get('path'))}, {_e(m.get('sweep', {}).get('jobs'))} jobs, "
                       f"seed {_e(m.get('seed'))}, status {_e(run.status)}, created {_e(m.get('created'))}"),
             ("Versions", _e(", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())))]
    return '<dl class="prov">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _judged(model: dict, metric: dict) -> list[tuple[str, str]]:
    """Provenance rows on what the metric compared and what the Run does not cover (when there is anything to say)."""
    rows = []
    outputs = model.get("outputs") or {}
    compared = [o for o in outputs.get("outputs", []) if o.get("compared")]
    if compared:
        text = ", ".join(f"{o['name']} ({', '.join(map(str, o['shape']))})" for o in compared)
        text += f" — {outputs.get('elements_per_sample')} values per sample"
        rows.append(("Compared", _e("; ".join([text, *outputs.get("notes", [])]))))
    if metric.get("chosen_because"):
        rows.append(("Metric chosen", _e(metric["chosen_because"])))
    missing = model.get("not_analysed") or []
    if missing:
        rows.append(("Not analysed", _e(f"{len(missing)} layer(s), FP32 in every policy: "
                                        + "; ".join(f"{x['layer']} ({x['reason']})" for x in missing))))
    return rows


def _layer_table(c: ReportContent) -> str:
    run, p = c.run, c.projector
    lay = run.layers.set_index("name")
    sens = run.sensitivity.set_index(["layer", "format"])
    head = ["#", "layer", "type", "params", "format", "KB"] + [f"Δloss {f}" for f in run.formats] + ["note"]
    rows = []
    for i, name in enumerate(p.names):
        # only the formats the Run measured are offered; a layer skipped for one of them has it disabled
        opts = "".join(f'<option value="{f}"{" selected" if k == c.chosen[i] else ""}'
                       f'{"" if p.allowed[i, k] else " disabled"}>{f}</option>'
                       for k, f in ((FORMAT_CODE[f], f) for f in p.formats))
        deltas = []
        for f in run.formats:
            v = sens["loss_delta"].get((name, f), np.nan)
            deltas.append(f"{v:+.3g}" if isinstance(v, float) and math.isfinite(v) else "—")
        notes = [f"no {f}: {p.reasons[(i, FORMAT_CODE[f])]}" for f in p.formats if (i, FORMAT_CODE[f]) in p.reasons]
        if name in lay.index and not bool(lay.at[name, "reaches_output"]):
            notes.insert(0, "does not reach the output (sensitivity 0 by construction)")
        rows.append([str(i), _e(name), _e(lay.at[name, "type"] if name in lay.index else ""),
                     f"{int(lay.at[name, 'params']):,}" if name in lay.index else "",
                     f'<select class="ql-fmt" data-i="{i}" aria-label="format of {_e(name)}">{opts}</select>',
                     f'<span id="ql-kb-{i}">{p.bytes[i, c.chosen[i]] / 1e3:.1f}</span>', *deltas, _e("; ".join(notes))])
    return _table(head, rows, num={0, 3, 5, *range(6, 6 + len(run.formats))}, attrs=' id="ql-layers"')


def _validation_table(c: ReportContent) -> str:
    p, run = c.projector, c.run
    rows = [[_e(v.name), fmt_metric(v.measured_metric, run), fmt_metric(v.projected_metric, run),
             fmt_metric(v.error, run, signed=True), "yes" if v.held_out else "no"] for v in p.validations]
    if not rows:
        return "<p>No measured whole-model policy to validate against.</p>"
    return _table(["policy", "measured", "projected", "error", "held out"], rows, num={1, 2, 3})


def _body(c: ReportContent, generated: str) -> str:
    run, pj = c.run, c.projection
    m = run.meta
    banners = []
    if m.get("synthetic") or str(m["model"].get("name", "")).startswith("synthetic:"):
        banners.append('<div class="banner info"><b>Synthetic Run</b>: generated numbers for testing; nothing here was measured.</div>')
    if run.status != "complete":
        banners.append(f'<div class="banner">This Run is <b>{_e(run.status)}</b>: the sweep did not finish; '
                       'layers without a measurement stay FP32.</div>')
    banners += [f'<div class="banner">{_e(n)}</div>' for n in c.chosen_notes]
    if c.frontier_note:
        banners.append(f'<div class="banner">Pareto frontier not drawn: {_e(c.frontier_note)}</div>')
    uni = [[_e(r["policy"]), fmt_metric(r["metric"], run), f"{r['loss']:.5f}" if r["loss"] is not None else "—",
            f"{r['bytes'] / 1e6:.3f}" if r["bytes"] else "—", _e(", ".join(r["kept"]) or "—")] for r in uniform_rows(run)]
    chans = has_channels(run.path)  # per-channel weight ranges beside each histogram, when the Run has them
    hists = "".join(f'<div id="fig-hist-{i}" class="fig small"></div>'
                    + (f'<div id="fig-chan-{i}" class="fig small"></div>' if chans else "")
                    for i in range(len(most_sensitive(run))))
    name = _e(m["metric"]["name"])
    fmt_buttons = "".join(f'<button type="button" data-all="{f}">all {f.upper()}</button>' for f in c.projector.formats)
    return f"""
<h1>QuantLens report — {_e(m['model'].get('name'))}</h1>
<p class="sub">Which layers can go to INT8 or INT4, and what each choice costs. Generated {_e(generated)}.</p>
{''.join(banners)}
<h2>Model and data</h2>
{_provenance(run)}
<h2>Baseline and uniform formats (measured)</h2>
{_table(["policy", name, _e(m['metric'].get('loss', 'loss')), "size MB", "layers kept FP32"], uni, num={1, 2, 3})}
<h2>Chosen policy — toggle layers to see the projection change</h2>
<p class="sub">Chosen: {_e(c.chosen_label)}. Projected numbers are recomputed here with the formula of
<code>analysis/project/projection.py</code>; ± is the largest error on measured whole-model policies.</p>
<div class="cards">
 <div class="card"><div class="label">Projected {name}</div><div class="value" id="ql-metric">{fmt_metric(pj.metric, run)}</div>
  <div class="note" id="ql-band">{_e(fmt_band(pj.band, run))}</div><div class="note" id="ql-delta"></div>
  <div class="note" id="ql-nearest"></div></div>
 <div class="card"><div class="label">Projected size</div><div class="value" id="ql-size">{pj.bytes / 1e6:.3f} MB</div>
  <div class="note" id="ql-bytes">{pj.bytes:,} B</div></div>
 <div class="card"><div class="label">Projected latency</div><div class="value" id="ql-latency">{
     f"{pj.latency_ms:.2f} ms" if pj.latency_ms is not None else "not measured"}</div></div>
 <div class="card"><div class="label">Layers quantized</div><div class="value" id="ql-count"></div>
  <div class="note" id="ql-mix"></div></div>
</div>
<div class="toolbar"><button type="button" id="ql-reset">reset to the chosen policy</button>{fmt_buttons}
 <span class="sub" id="ql-changed"></span></div>
<div class="scroll">{_layer_table(c)}</div>
<details><summary>Policy file for the policy shown (<code>quantlens.policy/1</code>)</summary><pre id="ql-policy-json"></pre></details>
<h2>Sensitivity per layer (measured)</h2>
<div id="fig-sensitivity" class="fig"></div>
<h2>Size vs {name}: Pareto frontier</h2>
<div id="fig-frontier" class="fig"></div>
<h2>Most sensitive layers: histograms</h2>
<div class="hists">{hists}</div>
<h2>How far to trust the projection</h2>
<p>Error band: <b>{_e(fmt_band(c.projector.band, run))}</b> — {_e(c.projector.band_method)}.</p>
{_validation_table(c)}
<div id="fig-validation" class="fig small"></div>
<footer>quantlens {_e((m.get('versions') or {}).get('quantlens', ''))} · Run schema {_e(m.get('schema'))} ·
this file makes no network requests.</footer>
"""


def render_html(run: Run, policy: Policy | None = None, policy_source: str | None = None) -> str:
    """The whole report page as one string (plotly.js inlined)."""
    from plotly.offline import get_plotlyjs

    c = build_content(run, policy, policy_source)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    figs, current_trace = figures(c, most_sensitive(run))
    data = {"model": projection_model(c.projector), "layers": c.projector.names, "formats": list(POLICY_FORMATS),
            "offered": [FORMAT_CODE[f] for f in c.projector.formats],
            "chosen": [int(x) for x in c.chosen], "sha256": run.model_sha256,
            "baseline_metric": float(run.meta["baseline"]["metric"]),
            "pct": run.meta["metric"].get("name") in ("accuracy", "agreement"),
            "figures": figs, "current_trace": current_trace}
    parts = {"title": _e(f"QuantLens report — {run.meta['model'].get('name')}"), "body": _body(c, generated),
             "data": _script_json(data), "plotlyjs": get_plotlyjs(),
             "app": (HERE / "template.js").read_text(encoding="utf-8")}
    template = (HERE / "template.html").read_text(encoding="utf-8")
    return re.sub(r"<!--ql:(\w+)-->", lambda mo: parts[mo.group(1)], template)


# ---- Markdown -------------------------------------------------------------------------------

def _md(x) -> str:
    """Text safe in a Markdown table cell: HTML escaped, Markdown punctuation backslashed."""
    s = html.escape("" if x is None else str(x), quote=False).replace("\n", " ")
    return re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", s)


def render_markdown(run: Run, policy: Policy | None = None, policy_source: str | None = None) -> str:
    """A short summary for a pull-request description."""
    c = build_content(run, policy, policy_source)
    m, pj, p = run.meta, c.projection, c.projector
    name = m["metric"]["name"]
    counts = np.bincount(c.chosen.astype(np.intp), minlength=len(POLICY_FORMATS))
    shown = [FORMAT_CODE[f] for f in p.formats]
    out = [f"### QuantLens: {_md(m['model'].get('name'))}", "",
           f"Model sha256 `{_md(run.model_sha256[:16])}…`, task {_md(m.get('data', {}).get('task'))} "
           f"({_md(m.get('data', {}).get('n_eval'))} eval samples), metric {_md(name)}, Run status {_md(run.status)}.", "",
           f"**Chosen policy** ({_md(c.chosen_label)}): "
           + ", ".join(f"{POLICY_FORMATS[i].upper()} {int(counts[i])}" for i in shown)
           + f" → projected {_md(name)} **{fmt_metric(pj.metric, run)}** ({_md(fmt_band(pj.band, run))}), "
           f"**{pj.bytes / 1e6:.3f} MB** ({pj.size_ratio:.2f}× smaller than FP32)"
           + (f", {pj.latency_ms:.2f} ms" if pj.latency_ms is not None else "") + ".", ""]
    out += [f"- {_md(n)}" for n in c.chosen_notes]
    out += ["", f"| policy | {_md(name)} (measured) | size MB | layers kept FP32 |", "|---|---:|---:|---|"]
    for r in uniform_rows(run):
        size = f"{r['bytes'] / 1e6:.3f}" if r["bytes"] else "—"
        out.append(f"| {_md(r['policy'])} | {fmt_metric(r['metric'], run)} | {size} | {_md(', '.join(r['kept'])) or '—'} |")
    out += ["", "Most sensitive layers (KL to FP32): " + (", ".join(_md(n) for n in most_sensitive(run, 5)) or "none measured"), ""]
    errs = [abs(v.error) for v in p.validations]
    out.append(f"Projection error band {_md(fmt_band(p.band, run))} over {len(errs)} measured whole-model "
               f"polic{'y' if len(errs) == 1 else 'ies'}." if errs else "No measured whole-model policy validates the projection.")
    out += ["", "<details><summary>Layer formats</summary>", "", "| layer | format |", "|---|---|"]
    out += [f"| {_md(n)} | {POLICY_FORMATS[int(k)]} |" for n, k in zip(p.names, c.chosen)]
    out += ["", "</details>", ""]
    return "\n".join(out)


# ---- writing --------------------------------------------------------------------------------

def write_report(run: Run, out: str | os.PathLike, *, fmt: str = "html", policy: Policy | None = None,
                 policy_source: str | None = None) -> Path:
    """Render and write atomically (a temporary file beside ``out``, then renamed)."""
    if fmt not in REPORT_FORMATS:
        raise ReportError(f"--format {fmt!r}: use one of {', '.join(REPORT_FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ReportError(f"{out}: is a folder; give a file name")
    if not out.parent.is_dir():
        raise ReportError(f"{out.parent}: folder does not exist")
    text = (render_html if fmt == "html" else render_markdown)(run, policy, policy_source)
    # a non-UTF-8 file name in the Run's provenance is written as a \udcXX escape, not refused
    write_text_atomic(out, text, errors="backslashreplace")
    return out
