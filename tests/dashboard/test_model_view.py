"""The Model view: its layout and figures (pure), and the page in AppTest (digits, synthetic, 1,000 layers, an old
Run without dataflow), where a click on a layer cycles its format once and the headline and address follow."""
from __future__ import annotations

import json

import numpy as np
import pytest

from analysis.api import POLICY_FORMATS, encode_codes, load_run
from analysis.store.run import replace_table
from analysis.store.synthetic import synthetic_run
from apptest_support import make_app, switch_page
from dashboard import state
from dashboard.ui.model_chart import LayerData, blocks_figure, clicked_rows, layers_figure, log_colour
from dashboard.ui.model_layout import block_of, model_layout, short_labels

MINI = ["embed", "enc.layer.0.q", "enc.layer.0.k", "enc.layer.0.v", "enc.layer.0.attn_out", "enc.layer.0.ffn_in",
        "enc.layer.0.ffn_out", "enc.layer.1.q", "enc.layer.1.k", "enc.layer.1.v", "enc.layer.1.attn_out",
        "enc.layer.1.ffn_in", "enc.layer.1.ffn_out", "pooler.dense"]


def mini_fed_by() -> dict[str, list[str]]:
    """Two post-LN transformer blocks as models.structure records them (see tests/test_structure.py)."""
    fed = {"embed": []}
    prev = ["embed"]
    for b in (0, 1):
        p = f"enc.layer.{b}."
        fed.update({p + "q": prev, p + "k": prev, p + "v": prev, p + "attn_out": [p + "q", p + "k", p + "v"],
                    p + "ffn_in": [prev[-1], p + "attn_out"], p + "ffn_out": [p + "ffn_in"]})
        prev = [p + "attn_out", p + "ffn_out"]
    fed["pooler.dense"] = prev
    return fed


def data_for(n: int, penalty=None) -> LayerData:
    pen = np.linspace(1e-4, 1e-1, n) if penalty is None else np.asarray(penalty, dtype=float)
    return LayerData(types=np.array(["Linear"] * n), params=np.full(n, 100), penalty=pen,
                     deltas={"int8": -pen / 10, "int4": -pen}, formats=list(POLICY_FORMATS))


def test_blocks_come_from_the_name_hierarchy():
    assert block_of("encoder.layer.3.attention.self.query") == "encoder.layer.3"
    assert block_of("/encoder/layer.3/attention/self/query/MatMul") == "encoder.layer.3"
    assert block_of("pooler.dense") == "pooler"
    assert block_of("features.0") == "features"  # a Sequential's numbered child is the layer, not a block
    assert block_of("conv1") == "" and block_of("MatMul_12") == ""
    assert short_labels(["b.0.attention.output.dense", "b.0.intermediate.dense", "b.0.output.dense"], "b.0") == \
        ["attention.output.dense", "intermediate.dense", "output.dense"]


def test_blocks_in_execution_order_with_parallel_branches_and_residual_arcs():
    lay = model_layout(MINI, mini_fed_by())
    assert [b.block for b in lay.bands] == ["", "enc.layer.0", "enc.layer.1", "pooler"]
    assert all(lay.bands[k].y_bottom > lay.bands[k + 1].y_top for k in range(3))  # top to bottom, not overlapping
    i = {n: k for k, n in enumerate(MINI)}
    q, k, v = i["enc.layer.1.q"], i["enc.layer.1.k"], i["enc.layer.1.v"]
    assert lay.y[q] == lay.y[k] == lay.y[v] and len({lay.x[q], lay.x[k], lay.x[v]}) == 3  # side by side
    skips = {(MINI[a], MINI[b]) for (a, b), s in zip(lay.edges, lay.skip) if s}
    assert ("enc.layer.0.ffn_out", "enc.layer.1.ffn_in") in skips  # the residual around block 1's attention
    assert ("enc.layer.0.attn_out", "enc.layer.1.q") in skips
    assert ("enc.layer.1.q", "enc.layer.1.attn_out") not in skips
    fig = layers_figure(lay, data_for(len(MINI)), np.zeros(len(MINI), dtype=np.int8), "Δ loss").fig
    arcs = next(t for t in fig.data if t.name == "skip / residual branch")
    assert np.isfinite(np.asarray(arcs.x, dtype=float)).sum() == 12 * len(skips)  # one 12-point arc per skip


def test_without_dataflow_layers_follow_execution_order_and_share_a_level_when_they_read_one_tensor():
    groups = [n if not n.endswith((".k", ".v")) else n.rsplit(".", 1)[0] + ".q" for n in MINI]
    lay = model_layout(MINI, None, groups)
    assert not lay.has_dataflow and len(lay.edges) == 0
    assert [b.block for b in lay.bands] == ["", "enc.layer.0", "enc.layer.1", "pooler"]
    y = dict(zip(MINI, lay.y))
    assert y["enc.layer.0.q"] == y["enc.layer.0.k"] == y["enc.layer.0.v"] > y["enc.layer.0.attn_out"]


def test_colours_follow_sensitivity_and_marks_follow_codes():
    n = len(MINI)
    pen = np.full(n, 1e-3)
    pen[5], pen[9], pen[3] = 1e-1, 0.0, np.nan  # most sensitive, zero, not measured
    codes = np.zeros(n, dtype=np.int8)
    codes[5], codes[7] = 2, 1
    lay = model_layout(MINI, mini_fed_by())
    drawn = layers_figure(lay, data_for(n, pen), codes, "KL divergence")
    colour = {}
    for t, rows in drawn.rows.items():
        tr = drawn.fig.data[t]
        symbol = tr.marker.symbol
        for k, r in enumerate(rows):
            assert symbol == {0: "circle", 1: "square", 2: "diamond"}[int(codes[r])]
            assert tr.text[k].endswith(POLICY_FORMATS[codes[r]].upper())
            colour[int(r)] = tr.marker.color if isinstance(tr.marker.color, str) else tr.marker.color[k]
    assert sorted(colour) == list(range(n))  # every layer drawn once
    assert colour[5] == max(c for c in colour.values() if not isinstance(c, str))
    assert colour[9] == min(c for c in colour.values() if not isinstance(c, str))  # zero sits at the floor
    assert isinstance(colour[3], str)  # not measured: grey, outside the scale
    bar = next(t.marker.colorbar for t in drawn.fig.data if t.marker is not None and t.marker.showscale)
    assert bar.title.text == "KL divergence (log)"
    c, lo, hi = log_colour(pen)
    assert hi == pytest.approx(-1) and lo == pytest.approx(-4)


def test_a_click_maps_back_to_the_layer_it_hit():
    lay = model_layout(MINI, mini_fed_by())
    drawn = layers_figure(lay, data_for(len(MINI)), np.zeros(len(MINI), dtype=np.int8), "Δ loss")
    trace, rows = next(iter(drawn.rows.items()))
    assert clicked_rows([{"curve_number": trace, "point_index": 2}], drawn.rows) == [int(rows[2])]
    assert clicked_rows([{"curve_number": 0, "point_index": 0}], drawn.rows) == []  # a band, not a layer


def test_a_thousand_layers_are_grouped_into_blocks(tmp_path):
    run = synthetic_run(tmp_path / "big", 1000)
    names = run.layer_names
    lay = model_layout(names, run.fed_by())
    assert 200 < len(lay.bands) < 400 and sum(len(b.rows) for b in lay.bands) == 1000
    assert [b.block for b in lay.bands[:2]] == ["features.0", "features.1"]
    assert np.array_equal(np.concatenate([b.rows for b in lay.bands]), np.arange(1000))  # execution order
    pen = np.random.default_rng(0).lognormal(-6, 1, 1000)
    codes = np.zeros(1000, dtype=np.int8)
    codes[lay.bands[4].rows] = 1
    drawn = blocks_figure(lay, data_for(1000, pen), codes, "Δ loss", picked=4)
    tr = drawn.fig.data[0]
    assert len(tr.x) == len(lay.bands)
    worst = int(np.argmax([pen[b.rows].max() for b in lay.bands]))
    assert np.argmax(tr.marker.color) == worst
    n4 = len(lay.bands[4].rows)
    assert tr.text[4] == f"{n4}/{n4}" and tr.marker.line.width[4] > tr.marker.line.width[3]


# ---- the page ---------------------------------------------------------------------------------------------------
def click(at, chart: str, row: int):
    """What the browser sends when a point of ``chart`` is clicked: its plotly selection, for layer or block ``row``."""
    rows = at.session_state[state.MODEL_ROWS][chart]
    trace, k = next((t, int(np.flatnonzero(r == row)[0])) for t, r in rows.items() if row in r)
    el = next(e for e in at.get("plotly_chart") if f"model_chart_{chart}::" in e.proto.id)  # state.model_chart_key
    ws = at._tree.get_widget_states()
    w = ws.widgets.add()
    w.id = el.proto.id
    w.string_value = json.dumps({"selection": {"points": [{"curve_number": trace, "point_number": k, "point_index": k}],
                                               "point_indices": [k], "box": [], "lasso": []}})
    return at._run(ws)


def codes_of(at) -> np.ndarray:
    return at.session_state[state.codes_key(at.session_state[state.RUN_DIRS][0])]


def quantized(at) -> str:
    return next(m.value for m in at.metric if m.label == "Layers quantized")


def test_a_click_cycles_the_layer_once_and_headline_and_address_follow(app, syn_dir):
    run = load_run(syn_dir)
    at = app([syn_dir], "model")
    assert not at.exception and at.title[0].value == "Model"
    assert any("Structure from the synthetic" in c.value for c in at.caption)
    n = len(run.layer_names)
    s = run.sensitivity
    row = next(i for i, nm in enumerate(run.layer_names)
               if set(s[(s.layer == nm) & (s.status == "ok")]["format"]) == {"int8", "int4"})
    for want in (1, 2, 0):  # fp32 -> int8 -> int4 -> fp32, one step per click on the same layer
        click(at, "layers", row)
        assert not at.exception
        codes = codes_of(at)
        assert codes[row] == want and (codes != 0).sum() == (want != 0)
        assert quantized(at) == f"{int(want != 0)} / {n}"
        assert at.query_params[state.QP_POLICY] == encode_codes(codes, run.model_sha256)
        at.run()  # a rerun with the selection still in place does not toggle again
        assert codes_of(at)[row] == want
    switch_page(at, "layers").run()
    assert not at.exception and quantized(at) == f"0 / {n}"


def test_the_page_draws_the_digits_run(app, digits_run):
    at = app([str(digits_run.path)], "model")
    assert not at.exception and len(at.get("plotly_chart")) == 1
    assert any("torch.fx graph" in c.value for c in at.caption)


def test_an_old_run_without_dataflow_says_so(app, tmp_path):
    run = synthetic_run(tmp_path / "old", 12, seed=3)
    replace_table(run, "layers", run.layers.drop(columns="fed_by"))
    at = app([str(run.path)], "model")
    assert not at.exception and len(at.get("plotly_chart")) == 1
    assert any("No dataflow in this Run" in c.value for c in at.caption)


def test_a_thousand_layers_open_on_blocks_and_a_block_click_opens_it(app, tmp_path):
    run = synthetic_run(tmp_path / "big", 1000)
    at = app([str(run.path)], "model")
    assert not at.exception and at.radio(key=state.MODEL_DRAW).value == "blocks"
    assert len(at.get("plotly_chart")) == 2
    click(at, "blocks", 40)
    assert not at.exception and at.selectbox(key=state.MODEL_BLOCK).value == 40
    shown = set(np.concatenate(list(at.session_state[state.MODEL_ROWS]["layers"].values())).tolist())
    lay = model_layout(run.layer_names, run.fed_by())
    assert set(lay.bands[40].rows.tolist()) <= shown and len(shown) < 20
    row = int(lay.bands[40].rows[0])
    click(at, "layers", row)
    assert not at.exception and codes_of(at)[row] == 1
    at.selectbox(key=state.MODEL_BLOCK).set_value(2).run()  # or picked by name
    shown = set(np.concatenate(list(at.session_state[state.MODEL_ROWS]["layers"].values())).tolist())
    assert not at.exception and set(lay.bands[2].rows.tolist()) <= shown
    assert not set(lay.bands[40].rows.tolist()) & shown
    at.radio(key=state.MODEL_DRAW).set_value("every layer").run()
    assert not at.exception and len(at.get("plotly_chart")) == 1
