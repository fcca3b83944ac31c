"""The HTML report and the Markdown summary: content, escaping, size, CLI, and JS/Python agreement.

The in-page projection is checked with node (not Chromium): it runs the exact script the
report embeds on hundreds of policies in well under a second; the browser test
(tests/e2e/test_report.py) checks the page's wiring once.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from analysis.cli.main import main
from analysis.store.policy import Policy, match_policy
from analysis.project.projection import Projector
from analysis.report.render import render_html, render_markdown, write_report
from analysis.store.run import load_run, write_run
from analysis.store.synthetic import synthetic_run

NODE = shutil.which("node")
MAX_REPORT_BYTES = 5_000_000
HOSTILE = ["</script><script>window.__pwned=1</script>", '"><img src=x onerror="window.__pwned=1">',
           "a|b`c*_[x](javascript:alert(1))", "<!--", "&amp;\u2028"]


def script(page: str, id_: str) -> str:
    return re.search(rf'<script[^>]*id="{id_}"[^>]*>(.*?)</script>', page, re.S).group(1)


def hostile_run(src, dest):
    """A copy of the Run at ``src`` whose first layers are renamed to strings that try to break out of HTML/JS/MD."""
    run = load_run(src)
    rename = dict(zip(run.layer_names, HOSTILE))
    t = {k: v.copy() for k, v in run.tables.items()}
    t["layers"]["name"] = t["layers"]["name"].map(lambda n: rename.get(n, n))
    for name in ("sensitivity", "histograms", "clipping", "cost"):
        t[name]["layer"] = t[name]["layer"].map(lambda n: rename.get(n, n))
    t["policies"]["layers_json"] = [json.dumps({rename.get(k, k): v for k, v in json.loads(s or "{}").items()})
                                    for s in t["policies"]["layers_json"]]
    meta = json.loads(json.dumps(run.meta))
    meta["model"]["name"] = "<b>model</b>"
    for u in meta.get("uniform", {}).values():
        u["skipped_layers"] = [rename.get(n, n) for n in u["skipped_layers"]]
    return write_run(dest, meta, t)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return synthetic_run(tmp_path_factory.mktemp("rep") / "syn30", 30, seed=3)


@pytest.fixture(scope="module")
def syn_v1(syn, tmp_path_factory):
    """The synthetic Run without its measured mixed policies: the projection falls back to v1."""
    t = {k: v.copy() for k, v in syn.tables.items()}
    t["policies"] = t["policies"][t["policies"]["kind"] != "random"]
    run = write_run(tmp_path_factory.mktemp("rep") / "v1", syn.meta, t)
    assert Projector(run).calibration is None and Projector(syn).calibration is not None
    return run


@pytest.fixture(scope="module")
def demo_html(digits_run):
    return render_html(digits_run)


def test_demo_report_is_self_contained_and_small(demo_html):
    size = len(demo_html.encode("utf-8"))
    assert size <= MAX_REPORT_BYTES, f"{size:,} bytes"
    assert "default-src 'none'" in demo_html  # the page's CSP forbids every request
    assert not re.search(r"<(link|img|iframe)\b", demo_html)
    assert not re.search(r"<script[^>]*\bsrc=", demo_html)
    assert "Plotly" in script(demo_html, "ql-plotly")


def test_report_holds_every_section(digits_run, demo_html):
    for text in ("Model and data", "Baseline and uniform formats", "Chosen policy", "Sensitivity per layer",
                 "Pareto frontier", "histograms", "How far to trust the projection", digits_run.model_sha256,
                 digits_run.meta["data"]["sha256"]):
        assert text in demo_html
    data = json.loads(script(demo_html, "ql-data"))
    assert set(data["figures"]) >= {"fig-sensitivity", "fig-frontier", "fig-validation", "fig-hist-0"}
    assert data["layers"] == digits_run.layer_names
    assert len(re.findall(r'<select class="ql-fmt"', demo_html)) == len(digits_run.layer_names)


def test_policy_file_sets_the_chosen_policy(syn):
    names = syn.layer_names
    pol = Policy(syn.model_sha256, {names[-1]: "int8", names[-2]: "int4", "no.such.layer": "int8"})
    page = render_html(syn, pol, "mine.json")
    data = json.loads(script(page, "ql-data"))
    codes, _ = Projector(syn).sanitize(match_policy(pol, syn).codes)
    assert data["chosen"] == codes.tolist()
    assert "from mine.json" in page and "no.such.layer" in page  # the mismatch is said, not hidden


@pytest.mark.skipif(NODE is None, reason="node is not installed")
@pytest.mark.parametrize("which", ["digits", "v1", "calibrated"])
def test_page_projection_matches_python(which, digits_run, syn, syn_v1, tmp_path):
    # digits: calibrated (v2) but a flat metric; v1: the loss -> metric map; calibrated: v2 with a varied metric
    run = {"digits": digits_run, "v1": syn_v1, "calibrated": syn}[which]
    page = render_html(run)
    pj = Projector(run)
    rng = np.random.default_rng(0)
    allowed = [np.flatnonzero(pj.allowed[i]) for i in range(len(pj.names))]
    policies = [[int(rng.choice(a)) for a in allowed] for _ in range(300)]
    policies += rng.integers(0, 3, size=(50, len(allowed))).tolist()  # formats a layer lacks, too
    policies += [[0] * len(allowed), [int(a[-1]) for a in allowed]]
    (tmp_path / "app.js").write_text(script(page, "ql-app"))
    (tmp_path / "data.json").write_text(script(page, "ql-data"))
    (tmp_path / "codes.json").write_text(json.dumps(policies))
    (tmp_path / "run.js").write_text(
        "const {qlProject} = require('./app.js'); const fs = require('fs');\n"
        "const m = JSON.parse(fs.readFileSync('data.json')).model;\n"
        "const codes = JSON.parse(fs.readFileSync('codes.json'));\n"
        "console.log(JSON.stringify(codes.map(c => qlProject(m, c))));\n")
    out = json.loads(subprocess.run([NODE, "run.js"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout)
    for codes, js in zip(policies, out):
        py = pj.project(np.array(codes))
        assert js["metric"] == pytest.approx(py.metric, abs=1e-9)
        assert js["bytes"] == py.bytes
        assert js["size_ratio"] == pytest.approx(py.size_ratio, rel=1e-12)
        assert js["extrapolated"] == py.extrapolated
        assert (js["latency_ms"] is None) == (py.latency_ms is None)
        if py.latency_ms is not None:
            assert js["latency_ms"] == pytest.approx(py.latency_ms, abs=1e-9)
        if py.nearest:
            assert (js["nearest"], js["distance"]) == (py.nearest, pytest.approx(py.distance))
    assert len({round(o["s"], 12) for o in out}) > 100  # the policies really differ
    if which != "digits":
        assert len({round(o["metric"], 9) for o in out}) > 100


def test_hostile_layer_names_are_escaped(syn, tmp_path):
    run = hostile_run(syn.path, tmp_path / "hostile")
    page = render_html(run)
    for bad in ("<script>window.__pwned", "<img src=x", "<b>model</b>", "<!--"):
        assert bad not in page.replace(script(page, "ql-plotly"), "")
    assert page.count("</script>") == 3  # data, plotly, app: no name closed a script early
    data = json.loads(script(page, "ql-data"))
    assert data["layers"][:len(HOSTILE)] == HOSTILE  # the page still shows the real names (as text)
    md = render_markdown(run)
    assert "<script>" not in md and "<img" not in md and "](javascript" not in md
    assert "a\\|b\\`c\\*\\_\\[x\\]\\(javascript:alert\\(1\\)\\)" in md


def test_markdown_summary(digits_run):
    md = render_markdown(digits_run)
    assert md.startswith("### QuantLens: demo:digits")
    assert "**Chosen policy**" in md and "| all-int8 |" in md and "| all-int4 |" in md
    assert all(f"| {n} |" in md for n in digits_run.layer_names)


def test_cli_report_html_md_and_errors(digits_run, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(digits_run.path), "--out", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    pol = tmp_path / "p.json"
    pol.write_text(Policy(digits_run.model_sha256, {digits_run.layer_names[0]: "int8"}).to_json())
    md = tmp_path / "r.md"
    assert main(["report", str(digits_run.path), "--policy", str(pol), "--format", "md", "--out", str(md)]) == 0
    assert "from p.json" in md.read_text()
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["report", str(digits_run.path), "--policy", str(bad), "--out", str(tmp_path / "x.html")]) == 2
    assert str(bad) in capsys.readouterr().err
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "x.html")]) == 2
    assert main(["report", str(digits_run.path), "--out", str(tmp_path / "missing" / "x.html")]) == 2
    assert not (tmp_path / "x.html").exists()


def test_write_is_atomic(digits_run, tmp_path, monkeypatch):
    out = tmp_path / "r.html"
    out.write_text("old")
    import analysis.report.render as report

    monkeypatch.setattr(report, "render_html", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        write_report(digits_run, out)
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]
