"""The demo Run end to end: files, shape of the tables, the numbers' sanity, determinism."""
import json

import numpy as np
import pandas as pd
import pytest

from analysis import analyze, load_run
from analysis.quant.sizes import policy_bytes
from analysis.store.run import TABLES


def test_demo_run_has_every_table_and_sane_numbers(digits_run):
    run = digits_run
    assert (run.path / "run.json").is_file()
    for name in TABLES:
        assert (run.path / f"{name}.parquet").is_file()
    assert run.meta["baseline"]["metric"] >= 0.95
    assert run.meta["sweep"]["path"] == "fx-incremental"
    sens = run.sensitivity
    assert len(sens) == len(run.layers) * len(run.formats)
    assert set(zip(sens.layer, sens.format)) == {(l, f) for l in run.layers.name for f in run.formats}
    ok = sens[sens.status == "ok"]
    # on average int4 perturbs the model at least as much as int8 (KL to FP32 outputs)
    assert ok[ok.format == "int4"].kl.mean() >= ok[ok.format == "int8"].kl.mean()
    assert (ok.output_sqnr_db > 0).all() and (ok.weight_sqnr_db > 0).all()
    assert (ok[ok.format == "int8"].weight_sqnr_db.values > ok[ok.format == "int4"].set_index("layer")
            .reindex(ok[ok.format == "int8"].layer).weight_sqnr_db.fillna(-1).values).all()


def test_group_size_skip_is_recorded_and_the_rest_proceed(digits_run):
    sens = digits_run.sensitivity.set_index(["layer", "format"])
    row = sens.loc[("conv1", "int4")]
    assert row.status == "skipped" and "does not divide" in row.reason and "K=9" in row.reason
    assert np.isnan(row.metric)
    assert digits_run.meta["uniform"]["int4"]["skipped_layers"] == ["conv1"]
    assert (sens.loc[("conv2", "int4")].status == "ok")


def test_sizes_add_up(digits_run):
    run = digits_run
    cost = run.cost
    assert policy_bytes(cost, {}, run.meta["model"]["other_bytes"]) == run.meta["baseline"]["bytes"]
    assert run.meta["baseline"]["bytes"] == run.meta["model"]["params"] * 4  # no buffers in this model
    all8 = {l: "int8" for l in run.layer_names}
    assert policy_bytes(cost, all8, run.meta["model"]["other_bytes"]) == run.meta["uniform"]["int8"]["bytes"]
    pol = run.policies.set_index("name")
    assert json.loads(pol.loc["all-int4", "layers_json"]).get("conv1") is None
    assert pol.loc["all-int4", "bytes"] < pol.loc["all-int8", "bytes"] < pol.loc["fp32", "bytes"]


def test_histograms_cover_every_layer_and_tensor(digits_run):
    h = digits_run.histograms
    assert len(h) == 3 * len(digits_run.layers)
    assert all(len(c) == 128 for c in h.counts)
    calib = digits_run.meta["data"]["n_calib"]
    inp = h[(h.tensor == "input") & (h.layer == "conv1")].iloc[0]
    assert inp["count"] == calib * 64 and sum(inp["counts"]) == inp["count"]
    clip = digits_run.clipping
    assert set(clip[clip.tensor == "input"].format) == {"int8"}  # int4 leaves activations in float


def test_load_run_round_trips(digits_run):
    again = load_run(digits_run.path)
    assert again.meta == json.loads((digits_run.path / "run.json").read_text())
    for name in TABLES:
        pd.testing.assert_frame_equal(getattr(again, name), getattr(digits_run, name), check_dtype=False)


@pytest.mark.slow
def test_same_seed_gives_identical_tables(digits_run, tmp_path):
    """Byte-identical tables; latency is a timing, so it is left out of this comparison."""
    one = analyze("demo:digits", "digits", tmp_path / "one", progress=False, latency=False, verify_policies=0)
    two = analyze("demo:digits", "digits", tmp_path / "two", progress=False, latency=False, verify_policies=0)
    for name in TABLES:
        assert (one.path / f"{name}.parquet").read_bytes() == (two.path / f"{name}.parquet").read_bytes(), name
    timed = ["latency_ms", "latency_spread_ms", "latency_source"]
    pd.testing.assert_frame_equal(digits_run.cost.drop(columns=timed), one.cost.drop(columns=timed))
    pd.testing.assert_frame_equal(digits_run.sensitivity, one.sensitivity)


def test_latency_is_measured_per_layer_and_end_to_end(digits_run):
    lat = digits_run.meta["latency"]
    assert lat["fp32_ms"] > 0 and lat["threads"] == 1 and set(lat["uniform"]) == {"int8", "int4"}
    assert digits_run.cost.latency_ms.notna().all()
    assert digits_run.cost.latency_source.str.contains("onnxruntime").all()
    assert digits_run.meta["cpu"]["model"] and "avx2" in digits_run.meta["cpu"]["isa"]


def test_custom_format_is_swept_without_touching_the_sweep(tmp_path):
    from analysis.quant.formats import PerChannel, QuantFormat, WeightSpec, _REGISTRY, register_format

    fmt = register_format(QuantFormat("int8w", "int8 weight-only", weight=WeightSpec(8, True, PerChannel(0))))
    try:
        run = analyze("factories:tiny_mlp", _npz(tmp_path), tmp_path / "r", formats=["int8w"], progress=False, latency=False, verify_policies=0)
    finally:
        _REGISTRY.pop(fmt.name)
    assert set(run.sensitivity.format) == {"int8w"} and (run.sensitivity.status == "ok").all()
    assert run.clipping[run.clipping.tensor == "input"].empty


def _npz(tmp_path, labels=True, n=80):
    rng = np.random.default_rng(0)
    arrays = {"inputs": rng.normal(size=(n, 64)).astype(np.float32)}
    if labels:
        arrays["labels"] = rng.integers(0, 10, n)
    p = tmp_path / ("lab.npz" if labels else "unlab.npz")
    np.savez(p, **arrays)
    return str(p)


def test_unlabeled_data_measures_agreement_with_fp32(tmp_path):
    run = analyze("factories:tiny_mlp", _npz(tmp_path, labels=False), tmp_path / "r", progress=False, latency=False, verify_policies=0)
    assert run.meta["metric"]["name"] == "agreement"
    assert run.meta["baseline"]["metric"] == 1.0 and run.meta["baseline"]["loss"] == pytest.approx(0.0, abs=1e-12)


def test_embedding_model_measures_cosine(tmp_path):
    # an (N, 16) embedding looks like class scores, so the metric is named explicitly
    run = analyze("factories:embedder", _npz(tmp_path, labels=False), tmp_path / "r", metric="cosine", progress=False, latency=False, verify_policies=0)
    assert run.meta["metric"]["name"] == "cosine"
    assert run.meta["baseline"]["metric"] == pytest.approx(1.0)
    ok = run.sensitivity[run.sensitivity.status == "ok"]
    assert (ok.metric < 1.0).all() and (ok.loss > 0).all()
