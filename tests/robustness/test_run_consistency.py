"""A Run whose tables disagree with run.json (or with each other) is refused by ``load_run`` with a
RunError naming the file and the field: projections, sizes and URL tokens would be silently wrong."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from analysis.store.run import RunError, load_run, replace_table


def _edit_sens(t):
    return t[~((t["layer"] == t["layer"].iloc[0]) & (t["format"] == "int4"))]


def _unknown_layer_cost(t):
    return pd.concat([t, t.iloc[[0]].assign(layer="ghost")], ignore_index=True)


def _unknown_format(t):
    return t.assign(format=t["format"].replace({"int4": "int3"}))


def _duplicate_row(t):
    return pd.concat([t, t.iloc[[0]]], ignore_index=True)


CASES = {  # name -> (table, edit, words the error holds)
    "a layer missing from sensitivity": ("sensitivity", _edit_sens, "no row for layer"),
    "cost rows for an unknown layer": ("cost", _unknown_layer_cost, "not in layers.parquet: ghost"),
    "sensitivity for an unknown layer": ("sensitivity", lambda t: t.assign(layer=t["layer"].replace({"fc1": "ghost"})),
                                         "not in layers.parquet"),
    "histograms for an unknown layer": ("histograms", _unknown_layer_cost, "not in layers.parquet: ghost"),
    "a format not in run.json (sensitivity)": ("sensitivity", _unknown_format, "int3, not in run.json field 'formats'"),
    "a format not in run.json (cost)": ("cost", _unknown_format, "int3, not in run.json field 'formats'"),
    "a format not in run.json (clipping)": ("clipping", _unknown_format, "int3"),
    "a layer listed twice": ("layers", _duplicate_row, "appears twice"),
    "two cost rows for one layer and format": ("cost", _duplicate_row, "two rows for layer"),
    "bytes as text": ("cost", lambda t: t.assign(bytes=t["bytes"].astype(str)), "column 'bytes' must be numeric"),
    "order as text": ("layers", lambda t: t.assign(order=t["order"].astype(str)), "column 'order' must be numeric"),
}


@pytest.fixture
def copy(tiny_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(tiny_run.path, dst)
    return load_run(dst)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tables_that_disagree_are_refused_naming_the_field(case, copy):
    table, edit, words = CASES[case]
    replace_table(copy, table, edit(copy.tables[table]))
    with pytest.raises(RunError, match=f"{table}.parquet") as e:
        load_run(copy.path)
    assert words in str(e.value)


@pytest.mark.parametrize("field, value, words", [
    ("formats", ["int8", "int8"], "field 'formats'"),
    ("formats", "int8,int4", "field 'formats'"),
    ("metric", {"name": "accuracy", "higher_is_better": "yes"}, "field 'metric.higher_is_better'"),
    ("model", {"name": "x"}, "field 'model.sha256'"),
    ("baseline", {"metric": "0.9", "loss": 0.1}, "field 'baseline.metric'"),
    ("status", "exploded", "field 'status'"),
])
def test_run_json_fields_of_the_wrong_type(copy, field, value, words):
    meta = {**copy.meta, field: value}
    (copy.path / "run.json").write_text(json.dumps(meta))
    with pytest.raises(RunError, match="run.json") as e:
        load_run(copy.path)
    assert words in str(e.value)


def test_a_format_dropped_from_run_json_is_refused(copy):
    meta = {**copy.meta, "formats": ["int8"]}
    (copy.path / "run.json").write_text(json.dumps(meta))
    with pytest.raises(RunError, match="int4, not in run.json field 'formats'"):
        load_run(copy.path)


def test_a_partial_run_with_pending_rows_still_loads(copy):
    sens = copy.sensitivity.copy()
    sens.loc[sens["format"] == "int4", ["status", "metric", "loss", "loss_delta", "kl"]] = ["pending", None, None, None, None]
    replace_table(copy, "sensitivity", sens)
    meta = {**copy.meta, "status": "partial"}
    (copy.path / "run.json").write_text(json.dumps(meta))
    run = load_run(copy.path)
    assert run.status == "partial" and (run.sensitivity["status"] == "pending").sum() == len(run.layer_names)
