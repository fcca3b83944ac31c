"""Numbers and words a reader can trust: no "None" for a missing value, no "-0.0000", latency with its digits and
one unit on every page, and the metric called what it is (``embedding`` is a cosine similarity)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from analysis.store.run import load_run, replace_table, update_meta
from analysis.store.synthetic import synthetic_run
from apptest_support import PAGES, layer_table, switch_page
from dashboard.components import fmt_metric, fmt_ms
from dashboard.data import Loaded, open_run

UNIT = "ms per batch of 32"


@pytest.fixture
def minilm_like(tmp_path) -> str:
    """A Run measured as the MiniLM demo is: the embedding metric, sub-millisecond latency per batch of 32,
    and a provenance field the engine left empty."""
    run = synthetic_run(tmp_path / "emb", 10, seed=4, n_random=2)
    cost = run.cost.copy()
    cost["latency_ms"] = np.where(cost["format"] == "fp32", 0.0043, np.where(cost["format"] == "int8", 0.0031, 0.0052))
    replace_table(run, "cost", cost)
    pol = run.policies.copy()
    pol["latency_ms"] = 0.0398
    replace_table(run, "policies", pol)
    update_meta(run, metric={"name": "embedding", "higher_is_better": True, "loss": "nmse_to_fp32",
                             "description": "mean cosine similarity of embeddings to FP32"},
                latency={"fp32_ms": 0.0412, "fp32_spread_ms": 0.0021, "unit": UNIT, "threads": 1},
                data={**run.meta["data"], "source": None})
    return str(run.path)


def loaded(path: str) -> Loaded:
    lo = open_run(path)
    assert isinstance(lo, Loaded), lo
    return lo


def all_pages(app, path):
    at = app([path], "overview")
    yield "overview", at
    for page in PAGES[1:]:
        switch_page(at, page).run()
        assert not at.exception
        yield page, at


def test_no_table_reads_none(app, minilm_like):
    seen = 0
    for page, at in all_pages(app, minilm_like):
        for el in [*at.dataframe, *at.data_editor]:
            assert el.proto.placeholder == "—", (page, list(el.value.columns))
            seen += 1
        for t in at.table:
            cells = t.value.astype(str).to_numpy().ravel().tolist()
            assert "None" not in cells and "nan" not in cells, (page, cells)
            seen += 1
    assert seen >= 6


def test_a_value_that_rounds_to_zero_has_no_sign(minilm_like, digits_run):
    emb, acc = loaded(minilm_like), loaded(str(digits_run.path))
    assert fmt_metric(-3e-5, emb, signed=True) == "0.0000" and fmt_metric(-3e-5, emb) == "0.0000"
    assert fmt_metric(-1e-7, acc, signed=True) == "0.00 pp"
    assert fmt_metric(-0.0123, emb, signed=True) == "-0.0123" and fmt_metric(0.0123, emb, signed=True) == "+0.0123"


def test_the_layer_table_shows_no_negative_zero(app, digits_run):
    at = app([str(digits_run.path)], "layers")
    at.selectbox(key="ql.columns").set_value("all measurements").run()
    df = layer_table(at).value
    cols = [c for c in df.columns if c.startswith(("Δmetric", "Δloss"))]
    assert cols
    for c in cols:
        v = df[c].to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        assert not np.any(np.signbit(v) & (np.round(v, 4) == 0)), (c, v)


@pytest.mark.parametrize("ms, text", [(0.0412, "0.0412"), (0.00043, "0.000430"), (1.2455, "1.25"), (7.0, "7.00"),
                                      (123.456, "123.46"), (0.0, "0")])
def test_latency_keeps_its_digits(ms, text):
    assert fmt_ms(ms) == text


def test_latency_is_never_rounded_away_and_has_one_unit_everywhere(app, minilm_like):
    lo = loaded(minilm_like)
    seen = set()
    for page, at in all_pages(app, minilm_like):
        if page == "layers":  # the per-layer latency columns are among all measurements, one choice away
            at.selectbox(key="ql.columns").set_value("all measurements").run()
        for m in at.metric:
            if "atency" in m.label:
                assert m.value == "0.0412 ms", (page, m.value)  # the FP32 policy: FP32's measured latency
                assert UNIT.removeprefix("ms ") in m.label + m.proto.delta, (page, m.label, m.proto.delta)
                seen.add(f"{page}: headline")
        for el in [*at.dataframe, *at.data_editor]:
            for col in el.value.columns:
                if "latency" in col or col.startswith("ms "):
                    seen.add(f"{page}: {col}")
                    cfg = json.loads(el.proto.columns or "{}")
                    spec = cfg.get(col, {})
                    help_text = spec.get("help", "")
                    assert UNIT in col or UNIT in help_text, (page, col, spec)
                    fmt = (spec.get("type_config") or {}).get("format")
                    if fmt:
                        decimals = int(re.fullmatch(r"%\.(\d)f", fmt).group(1))
                        v = el.value[col].to_numpy(dtype=float)
                        v = v[np.isfinite(v) & (v != 0)]
                        assert np.all(np.round(v, decimals) != 0), (page, col, fmt)
        for n in at.number_input:
            if "atency" in n.label:
                assert n.label == f"Max latency ({UNIT})"
                seen.add(f"{page}: budget")
    assert {"overview: headline", "layers: headline", "search: headline", "search: budget",
            "layers: ms fp32", "layers: ms int8", f"overview: latency ({UNIT})",
            f"export: latency ({UNIT})"} <= seen, seen
    assert lo.has_latency


def test_the_embedding_metric_is_called_cosine_similarity(app, minilm_like):
    for page, at in all_pages(app, minilm_like):
        labels = [m.label for m in at.metric] + [n.label for n in at.number_input]
        labels += [str(c) for el in [*at.dataframe, *at.data_editor] for c in el.value.columns]
        labels += [md.value for md in at.markdown]
        assert not [x for x in labels if re.search(r"\bembedding\b", x)], page
        if page in ("overview", "layers", "search"):
            assert any(x.startswith("Projected cosine similarity (") for x in labels), (page, labels)
        if page == "search":
            assert "Max cosine similarity drop from FP32 (cosine similarity units)" in labels
        if page == "export":
            assert any("projected cosine similarity" in x for x in labels)
    provenance = " ".join(" ".join(t.value.astype(str).to_numpy().ravel()) for t in app([minilm_like]).table)
    assert "cosine similarity" in provenance and "embedding" in provenance  # the name the Run stores, explained


def test_the_layer_table_shows_key_columns_and_every_measurement_on_request(app, minilm_like):
    """Key columns fit a 1400 px window (the browser test measures it); every measured column is one choice away."""
    at = app([minilm_like], "layers")
    ed = layer_table(at)
    shown = list(ed.proto.column_order)
    assert shown == ["layer", "format", "type", "params", "Δmetric int8", "Δmetric int4", "note"]
    at.selectbox(key="ql.columns").set_value("all measurements").run()
    assert not at.exception
    ed = layer_table(at)
    assert not list(ed.proto.column_order)  # every column of the frame
    assert {"sensitivity int4", "SQNR int8 (dB)", "KB fp32", "ms int8"} <= set(ed.value.columns)
