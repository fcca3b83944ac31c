"""Every page renders; a toggle moves the projected size by exactly that layer's bytes."""
from __future__ import annotations

import re

import numpy as np
import pytest

from analysis.store.policy import encode_codes
from analysis.store.run import load_run, replace_table, update_meta
from analysis.store.synthetic import synthetic_run
from apptest_support import PAGES, click_format, layer_table, open_bulk, select_rows, set_format
from dashboard import state


def size_bytes(at) -> int:
    m = next(m for m in at.metric if m.label == "Projected size")
    return int(re.search(r"([\d,]+) B", m.proto.delta).group(1).replace(",", ""))


def edit(at, path: str, row: int, fmt: str):
    """Clicks on the format cell of ``row`` (a position in the table) until it shows ``fmt``."""
    return set_format(at, row, fmt)


@pytest.mark.parametrize("page", list(PAGES))
def test_page_renders(app, syn_dir, page):
    at = app([syn_dir], page)
    assert not at.exception
    assert not at.error
    assert any("Synthetic Run" in i.value for i in at.info)


def test_layers_page_shows_headline_table_and_chart(app, syn_dir):
    at = app([syn_dir], "layers")
    labels = [m.label for m in at.metric]
    assert any(lab.startswith("Projected accuracy (±") for lab in labels)
    assert "Projected size" in labels and "Latency" in labels
    assert len(layer_table(at).value) == 40  # the layer table
    run = load_run(syn_dir)
    assert size_bytes(at) == run.meta["model"]["fp32_bytes"]


@pytest.mark.parametrize("row, fmt", [(5, "int8"), (-1, "int4"), (39, "int8")])
def test_toggle_changes_size_by_exactly_that_layers_bytes(app, syn_dir, row, fmt):
    run = load_run(syn_dir)
    if row < 0:  # the last layer that can take int4
        ok = run.sensitivity[(run.sensitivity.format == "int4") & (run.sensitivity.status == "ok")]["layer"]
        row = max(run.layer_names.index(n) for n in ok)
    at = app([syn_dir], "layers")
    path = at.session_state["ql.run_dirs"][0]
    before = size_bytes(at)
    at = edit(at, path, row, fmt)
    assert not at.exception
    layer = run.layer_names[row]
    bt = run.bytes_table()
    assert size_bytes(at) - before == int(bt.loc[layer, fmt] - bt.loc[layer, "fp32"])
    codes = at.session_state[f"ql.codes::{path}"]
    assert codes[row] == {"int8": 1, "int4": 2}[fmt] and np.count_nonzero(codes) == 1
    assert at.query_params["p"] == encode_codes(codes, run.model_sha256)  # the address bar follows


def test_format_a_layer_cannot_take_is_refused_on_the_page(app, syn_dir):
    """A click skips it; setting selected rows to it keeps that layer at FP32 and says why."""
    run = load_run(syn_dir)
    skipped = run.meta["uniform"]["int4"]["skipped_layers"][0]
    row = run.layer_names.index(skipped)
    at = app([syn_dir], "layers")
    path = at.session_state["ql.run_dirs"][0]
    before = size_bytes(at)
    seen = []
    for _ in range(2):
        click_format(at, row)
        seen.append(layer_table(at).value["format"].iloc[row])
    assert seen == ["int8", "fp32"]  # int4 is not on this layer's cycle
    select_rows(at, path, [row]).run()
    at.button(key=state.set_selected_key("int4")).click().run()
    assert not at.exception
    assert any(skipped in w.value and "int4 not available" in w.value for w in at.warning)
    assert size_bytes(at) == before and at.session_state[f"ql.codes::{path}"][row] == 0


def test_bulk_all_to_int8_then_top_n(app, syn_dir):
    run = load_run(syn_dir)
    at = open_bulk(app([syn_dir], "layers"))
    path = at.session_state["ql.run_dirs"][0]
    at.selectbox(key="ql.bulk_fmt").set_value("int8")
    at.button(key="ql.bulk_set").click().run()
    assert not at.exception
    assert size_bytes(at) == run.meta["uniform"]["int8"]["bytes"]
    at.number_input(key="ql.bulk_n").set_value(5)
    at.selectbox(key="ql.bulk_rest").set_value("int4")
    at.button(key="ql.bulk_topn").click().run()
    codes = at.session_state[f"ql.codes::{path}"]
    sens = run.sensitivity[(run.sensitivity.format == "int4") & (run.sensitivity.status == "ok")]
    top5 = set(sens.nlargest(5, "loss_delta")["layer"])
    names = run.layer_names
    assert {names[i] for i in np.nonzero(codes == 0)[0]} == top5 | set(run.meta["uniform"]["int4"]["skipped_layers"])
    # a later edit in the rebuilt table still lands on the right layer
    row = next(i for i, n in enumerate(names) if n in top5)
    at = edit(at, path, row, "int8")
    assert at.session_state[f"ql.codes::{path}"][row] == 1


def test_filter_and_sort_keep_edits_on_the_right_layer(app, syn_dir):
    run = load_run(syn_dir)
    at = app([syn_dir], "layers")
    path = at.session_state["ql.run_dirs"][0]
    at.selectbox(key="ql.sort").set_value("most sensitive at INT8").run()
    at.multiselect(key="ql.filter_types").set_value(["Linear"]).run()
    assert not at.exception
    from analysis.project.projection import Projector

    pj = Projector(run)
    lin = set(run.layers[run.layers.type == "Linear"]["name"])
    penalty = {n: pj.penalty[i, 1] for i, n in enumerate(pj.names) if n in lin and pj.allowed[i, 1]}
    first = max(penalty, key=penalty.get)  # the sort ranks by the projection's per-layer penalty
    at = edit(at, path, 0, "int8")
    codes = at.session_state[f"ql.codes::{path}"]
    assert np.count_nonzero(codes) == 1 and codes[run.layer_names.index(first)] == 1


def test_url_restores_the_policy(app, syn_dir):
    run = load_run(syn_dir)
    codes = np.zeros(40, dtype=np.int8)
    codes[[1, 2, 30]] = [1, 2, 1]
    at = app([syn_dir], "overview", {"run": "0", "p": encode_codes(codes, run.model_sha256)})
    assert not at.exception
    assert at.session_state[f"ql.codes::{at.session_state['ql.run_dirs'][0]}"].tolist() == codes.tolist()


@pytest.mark.parametrize("token, why", [("garbage", "not applied"),
                                        ("q1.000000000000.40.AAAAAAAAAAAAAA", "another model"),
                                        ("q1.000000000000.40.AAAA", "bytes of codes")])
def test_bad_url_token_is_a_message(app, syn_dir, token, why):
    at = app([syn_dir], "overview", {"p": token})
    assert not at.exception
    assert any(why in w.value for w in at.warning)


def test_activations_switch_layer(app, syn_dir):
    run = load_run(syn_dir)
    at = app([syn_dir], "activations")
    at.selectbox(key="ql.act_layer").set_value(run.layer_names[-1]).run()
    at.toggle(key="ql.act_log").set_value(False).run()
    assert not at.exception
    assert any("Clipping" in s.value for s in at.subheader)


def test_switch_between_open_runs_keeps_each_policy(app, syn_dir, other_dir):
    at = app([syn_dir, other_dir], "layers")
    p0, p1 = at.session_state["ql.run_dirs"]
    at = edit(at, p0, 3, "int8")
    at.sidebar.selectbox[0].set_value(1).run()
    assert not at.exception
    assert size_bytes(at) == load_run(other_dir).meta["model"]["fp32_bytes"]
    at.sidebar.selectbox[0].set_value(0).run()
    assert at.session_state[f"ql.codes::{p0}"][3] == 1


@pytest.mark.parametrize("page", list(PAGES))
def test_pages_on_the_demo_run(app, digits_run, page):
    """The real demo Run (with measured mixed policies: the calibrated projection)."""
    at = app([str(digits_run.path)], page)
    assert not at.exception and not at.error
    assert not any("Synthetic" in i.value for i in at.info)


def test_toggle_on_the_demo_run(app, digits_run):
    run = digits_run
    sens = run.sensitivity
    row = next(i for i, n in enumerate(run.layer_names)
               if ((sens.layer == n) & (sens.format == "int4") & (sens.status == "ok")).any())
    at = app([str(run.path)], "layers")
    path = at.session_state["ql.run_dirs"][0]
    before = size_bytes(at)
    at = edit(at, path, row, "int4")
    bt = run.bytes_table()
    layer = run.layer_names[row]
    assert size_bytes(at) - before == int(bt.loc[layer, "int4"] - bt.loc[layer, "fp32"])


def test_latency_shows_when_measured(app, tmp_path):
    run = synthetic_run(tmp_path / "lat", 10, seed=4, n_random=0)
    cost = run.cost.copy()
    cost["latency_ms"] = np.where(cost["format"] == "fp32", 0.5, np.where(cost["format"] == "int8", 0.25, 0.75))
    replace_table(run, "cost", cost)
    update_meta(run, latency={"fp32_ms": 7.0, "unit": "ms per batch of 32", "threads": 1})
    at = app([str(run.path)], "layers")
    lat = next(m for m in at.metric if m.label == "Projected latency")
    assert lat.value == "7.00 ms"
    at = edit(at, at.session_state["ql.run_dirs"][0], 2, "int8")
    assert next(m for m in at.metric if m.label == "Projected latency").value == "6.75 ms"
    at.selectbox(key=state.COLUMNS).set_value("all measurements").run()  # the key columns leave latency out
    assert {"ms fp32", "ms int8", "ms int4"} <= set(layer_table(at).value.columns)
