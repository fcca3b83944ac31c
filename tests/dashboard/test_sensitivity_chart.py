"""The per-layer sensitivity chart scales: horizontal bars with short names (full name on hover), sorted by
sensitivity or execution order, a top N, a log scale; 37 MiniLM layers readable, 1,000 layers usable."""
from __future__ import annotations

import json

import numpy as np
import pytest

from analysis.store.synthetic import synthetic_run
from apptest_support import make_app
from dashboard import state
from dashboard.data import Loaded, open_run
from dashboard.ui.charts import BAR_ORDERS, LABELLED_ROWS, SHORT_NAME, sensitivity_figure, short_names

MINILM = [f"encoder.layer.{b}.{part}" for b in range(6)
          for part in ("attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense", "intermediate.dense", "output.dense")] + ["pooler.dense"]


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bars") / "syn1000"
    synthetic_run(path, 1000, seed=3, n_random=2)
    return str(path)


def loaded(path: str) -> Loaded:
    lo = open_run(path)
    assert isinstance(lo, Loaded), lo
    return lo


def chart_spec(at) -> dict:
    """The sensitivity chart's plotly figure as the browser gets it."""
    charts = [c for c in at.get("plotly_chart") if json.loads(c.proto.spec)["layout"].get("title", {})
              .get("text", "").startswith("Sensitivity")]
    assert len(charts) == 1
    return json.loads(charts[0].proto.spec)


def test_short_names_fit_stay_unique_and_read_alike():
    short = short_names(MINILM)
    assert max(map(len, short)) <= SHORT_NAME
    assert len(set(short)) == len(MINILM)
    assert short[0] == "enc.lay.0.att.self.query" and short[5] == "enc.lay.0.out.dense"
    assert short[-1] == "pooler.dense"
    assert short_names(["model.features.0", "model.features.3"]) == ["features.0", "features.3"]
    # two names that would cut to one label keep their full names
    assert short_names(["a.attention_one.x", "a.attention_two.x"], width=8) == ["a.attention_one.x", "a.attention_two.x"]


def test_bars_are_horizontal_with_full_names_on_hover(syn_dir):
    lo = loaded(syn_dir)
    fig = sensitivity_figure(lo.layers, lo.run.formats, "KL", "int4")
    assert fig.data and all(t.orientation == "h" for t in fig.data)
    names = lo.layers["layer"].tolist()
    shown = [row[0] for row in fig.data[0].customdata]
    assert sorted(shown) == sorted(names)  # every layer, named in full on hover
    assert list(fig.layout.yaxis.ticktext) == short_names(shown)
    assert fig.layout.yaxis.autorange == "reversed"  # the first row at the top


def test_order_top_n_and_log_scale(syn_dir):
    lo = loaded(syn_dir)
    sens = lo.layers["sensitivity int4"].to_numpy(dtype=float)
    fig = sensitivity_figure(lo.layers, lo.run.formats, "KL", "int4", BAR_ORDERS[0], top=5)
    int4 = next(t for t in fig.data if t.name == "INT4")
    want = np.sort(sens[np.isfinite(sens)])[::-1][:5]
    np.testing.assert_allclose(np.asarray(int4.x, dtype=float), want)
    fig = sensitivity_figure(lo.layers, lo.run.formats, "KL", "int4", BAR_ORDERS[1], top=5)
    int4 = next(t for t in fig.data if t.name == "INT4")
    rows = [int(r[1]) - 1 for r in int4.customdata]
    assert rows == sorted(rows) and sorted(sens[rows].tolist(), reverse=True) == want.tolist()
    assert sensitivity_figure(lo.layers, lo.run.formats, "KL", "int4", log_x=True).layout.xaxis.type == "log"


def test_a_thousand_layers_stay_usable(big_dir):
    lo = loaded(big_dir)
    every = sensitivity_figure(lo.layers, lo.run.formats, "KL", "int4")
    assert len(every.data[0].x) == 1000 and every.layout.height <= 1600
    assert every.layout.yaxis.showticklabels is False  # 1,000 ticks cannot be read: hover names them
    top = sensitivity_figure(lo.layers, lo.run.formats, "KL", "int4", top=LABELLED_ROWS)
    assert top.layout.yaxis.showticklabels is not False and len(top.layout.yaxis.ticktext) == LABELLED_ROWS


def test_the_layers_page_draws_it_with_its_controls(app, syn_dir, big_dir):
    at = app([syn_dir], "layers")
    spec = chart_spec(at)
    assert {t["orientation"] for t in spec["data"]} == {"h"}
    assert len(spec["data"][0]["customdata"]) == 40  # a small Run: every layer
    at.radio(key=state.BARS_ORDER).set_value(BAR_ORDERS[1])
    at.toggle(key=state.BARS_LOG).set_value(True).run()
    assert not at.exception
    spec = chart_spec(at)
    assert spec["layout"]["xaxis"]["type"] == "log"
    rows = [int(r[1]) for r in spec["data"][0]["customdata"]]
    assert rows == list(range(1, 41))

    at = app([big_dir], "layers")
    spec = chart_spec(at)
    assert len(spec["data"][0]["customdata"]) == 30  # the 30 most sensitive by default
    at.number_input(key=state.bars_top_key(loaded(big_dir).path)).set_value(0).run()
    assert not at.exception
    assert len(chart_spec(at)["data"][0]["customdata"]) == 1000
