"""Layer selections for bulk policy edits, and two Runs' layers matched by name."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.api import (Projector, fp32_for_most_sensitive, layer_types, layers_of_type, match_layers,
                          most_sensitive, with_format)
from analysis.store.run import replace_table, update_meta
from analysis.store.synthetic import synthetic_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return synthetic_run(tmp_path_factory.mktemp("sel") / "run", 30, seed=3, n_random=0)


@pytest.fixture(scope="module")
def pj(run):
    return Projector(run)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synthetic_run(tmp_path_factory.mktemp("sel") / "small", 9, seed=4, n_random=0)


def test_layers_of_type_reads_the_layers_table_in_execution_order(run):
    types = run.layers.set_index("name").loc[run.layer_names, "type"].to_numpy()
    assert layer_types(run) == ["Conv2d", "Linear"]
    for t in layer_types(run):
        assert np.array_equal(layers_of_type(run, t), types == t)
    assert layers_of_type(run, ["Conv2d", "Linear"]).all()
    assert not layers_of_type(run, "LSTM").any()


def test_a_type_name_that_reads_like_a_label_is_selected_as_it_is(tmp_path):
    """Types are data, not parsed from a display label: spaces and the word "layers" are fine."""
    odd = synthetic_run(tmp_path / "odd", 6, seed=1, n_random=0)
    layers = odd.layers.copy()
    layers.loc[layers["order"] >= 4, "type"] = "all Linear layers"
    replace_table(odd, "layers", layers)
    assert layer_types(odd) == ["Conv2d", "Linear", "all Linear layers"]
    assert layers_of_type(odd, "all Linear layers").tolist() == [False] * 4 + [True] * 2
    assert layers_of_type(odd, "Linear").sum() == 2


def test_with_format_by_mask_and_by_index_leaves_the_input_alone(run):
    codes = np.zeros(len(run.layer_names), dtype=np.int8)
    mask = layers_of_type(run, "Linear")
    out = with_format(codes, mask, "int8")
    assert out.dtype == np.int8 and np.array_equal(out, mask.astype(np.int8)) and not codes.any()
    assert with_format(out, [0, 2], "int4")[[0, 1, 2]].tolist() == [2, out[1], 2]
    assert not with_format(out, np.ones(len(out), dtype=bool), "fp32").any()
    assert np.array_equal(with_format(codes, mask, 1), out)


@pytest.mark.parametrize("call, error", [
    (lambda c: with_format(c, np.ones(3, dtype=bool), "int8"), ValueError),
    (lambda c: with_format(c, [0], "int3"), KeyError),
    (lambda c: with_format(c, [0], 7), KeyError),
])
def test_with_format_refuses_what_does_not_fit(run, call, error):
    with pytest.raises(error):
        call(np.zeros(len(run.layer_names), dtype=np.int8))


def test_unknown_format_names_the_known_ones(pj):
    with pytest.raises(KeyError, match="unknown format 'int3'; known: fp32, int4, int8"):
        most_sensitive(pj, 1, "int3")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_most_sensitive_ranks_by_the_projections_penalty(pj, fmt):
    f = {"int8": 1, "int4": 2}[fmt]
    ok = np.nonzero(pj.allowed[:, f])[0]
    want = sorted(ok, key=lambda i: -pj.penalty[i, f])[:5]
    assert most_sensitive(pj, 5, fmt).tolist() == want
    assert most_sensitive(pj, 0, fmt).size == 0


def test_layers_that_cannot_take_the_format_rank_last(pj):
    cannot = np.nonzero(~pj.allowed[:, 2])[0]
    assert cannot.size  # the synthetic Run skips INT4 where the input dimension is not a multiple of 32
    ranked = most_sensitive(pj, len(pj.names), "int4")
    assert sorted(ranked.tolist()) == list(range(len(pj.names)))
    assert set(ranked[-cannot.size:].tolist()) == set(cannot.tolist())


@pytest.mark.parametrize("n", [-1, 31])
def test_most_sensitive_refuses_n_out_of_range(pj, n):
    with pytest.raises(ValueError, match="between 0 and the Run's 30 layers"):
        most_sensitive(pj, n, "int8")


def test_fp32_for_most_sensitive(pj):
    codes = fp32_for_most_sensitive(pj, 4, "int4")
    top = most_sensitive(pj, 4, "int4")
    assert codes.dtype == np.int8 and (codes[top] == 0).all()
    assert (np.delete(codes, top) == 2).all()  # asked for; sanitize keeps the layers that cannot take it
    clean, notes = pj.sanitize(codes)
    cannot = ~pj.allowed[:, 2]
    assert (clean[cannot] == 0).all() and len(notes) == int(cannot.sum())
    assert fp32_for_most_sensitive(pj, len(pj.names), "int8").tolist() == [0] * len(pj.names)


def test_match_layers_matches_by_name_in_execution_order(run, small):
    m = match_layers(run, small)
    t = m.table
    assert list(t.columns) == ["layer", "in", "Δloss int8 A", "Δloss int4 A", "Δloss int8 B", "Δloss int4 B"]
    assert t["layer"].tolist() == run.layer_names  # small's layers are a subset of run's by name
    assert m.only_b == [] and m.both == 9 and m.only_a == [n for n in run.layer_names if n not in small.layer_names]
    assert (t["in"] == "both").sum() == 9 and (t["in"] == "A").sum() == 21
    for side, r in (("A", run), ("B", small)):
        sens = r.sensitivity
        for fmt in ("int8", "int4"):
            want = sens[sens["format"] == fmt].set_index("layer")["loss_delta"]
            got = t.set_index("layer")[f"Δloss {fmt} {side}"].dropna()
            pd.testing.assert_series_equal(got, want.reindex(got.index).dropna(), check_names=False)
    assert t.loc[t["in"] == "A", ["Δloss int8 B", "Δloss int4 B"]].isna().all().all()


def test_match_layers_swapped_lists_layers_only_in_b_after_as_order(run, small):
    m = match_layers(small, run)
    extra = [n for n in run.layer_names if n not in small.layer_names]
    assert m.only_a == [] and m.only_b == extra
    assert m.table["layer"].tolist() == small.layer_names + extra
    assert m.table["in"].tolist() == ["both"] * 9 + ["B"] * 21


def test_match_layers_with_disjoint_names_and_one_format(tmp_path, small):
    other = synthetic_run(tmp_path / "other", 4, seed=2, n_random=0)  # renamed, and measured at INT8 only
    update_meta(other, formats=["int8"])
    layers = other.layers.copy()
    layers["name"] = "decoder." + layers["name"]
    sens = other.sensitivity[other.sensitivity["format"] == "int8"].copy()
    sens["layer"] = "decoder." + sens["layer"]
    replace_table(other, "layers", layers)
    replace_table(other, "sensitivity", sens)
    m = match_layers(small, other)
    assert m.both == 0 and m.only_a == small.layer_names and m.only_b == other.layer_names
    assert "Δloss int4 B" not in m.table and m.table["Δloss int8 B"].iloc[9:].notna().all()


def test_match_layers_is_linear_in_layers(tmp_path):
    """10,000 layers a side: a quadratic name match would take minutes; this one is a hash join."""
    n = 10_000
    names = [f"blocks.{i}.fc" for i in range(n)]

    class Fake:  # only what match_layers reads
        def __init__(self, names):
            self.layer_names = names
            self.formats = ["int8"]
            self.sensitivity = pd.DataFrame({"layer": names, "format": "int8",
                                             "loss_delta": np.arange(len(names), dtype=float)})

    m = match_layers(Fake(names), Fake(names[::-1][: n // 2]))
    assert m.both == n // 2 and len(m.only_a) == n // 2
    t = m.table.set_index("layer")
    assert t.loc["blocks.9999.fc", "Δloss int8 B"] == 0.0 and np.isnan(t.loc["blocks.0.fc", "Δloss int8 B"])
