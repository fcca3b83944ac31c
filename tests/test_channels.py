"""Per-output-channel weight statistics: the right axis per layer kind and framework, exact values, the
Run's optional ``channels`` table (written, resumed, bundled; absent in older Runs)."""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from analysis.engine import channels as ch
from analysis.engine.channels import layer_channels, weight_tables
from analysis.models.onnx_model import load_onnx_model
from analysis.models.torch_model import TorchModel
from analysis.quant.formats import INT4, INT8, PerTensor, WeightSpec
from analysis.quant.primitives import fake_quantize_weight
from analysis.store.bundle import open_bundle, write_bundle
from analysis.store.channels import CHANNEL_COLUMNS, read_channels
from analysis.store.run import RunError, load_run

FORMATS = [INT8, INT4]


def _pattern(k: int) -> np.ndarray:
    """Values in [-0.5, 1] (both reached): scaled by c + 1, output channel c has min -(c+1)/2 and max c+1."""
    return np.linspace(-0.5, 1.0, k, dtype=np.float32)


def _known(out: int, k: int) -> np.ndarray:
    """An (out, k) weight whose row c is (c + 1) * pattern."""
    return (np.arange(1, out + 1, dtype=np.float32)[:, None] * _pattern(k)[None, :]).astype(np.float32)


class KnownChannels(nn.Module):
    """Conv [out,in,kh,kw], grouped and plain ConvTranspose [in,out/g,kh,kw], Linear [out,in]: every layer's
    output channel c holds (c + 1) * pattern, laid out in the layer's own stored axes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gconvt = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)
        self.convt = nn.ConvTranspose2d(6, 3, 1)
        self.fc = nn.Linear(3 * 8 * 8, 5)
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(_known(4, 18).reshape(4, 2, 3, 3)))
            w = _known(6, 2 * 4)  # output channel o = g * 3 + j reads inputs g*2..g*2+1
            stored = np.zeros((4, 3, 2, 2), np.float32)
            for o in range(6):
                g, j = divmod(o, 3)
                stored[g * 2:(g + 1) * 2, j] = w[o].reshape(2, 2, 2)
            self.gconvt.weight.copy_(torch.from_numpy(stored))
            self.convt.weight.copy_(torch.from_numpy(_known(3, 6).T.reshape(6, 3, 1, 1).copy()))
            self.fc.weight.copy_(torch.from_numpy(_known(5, 192)))

    def forward(self, x):
        return self.fc(self.convt(self.gconvt(self.conv(x))).flatten(1))


def _known_onnx(path) -> str:
    """Conv (axis 0), ConvTranspose (axis 1), MatMul [in,out] (axis 1), Gemm transB=1 [out,in] (axis 0)
    and Gemm transB=0 [in,out] (axis 1); output channel c of each holds (c + 1) * pattern."""
    inits = [numpy_helper.from_array(_known(4, 18).reshape(4, 2, 3, 3), "Wc"),
             numpy_helper.from_array(_known(3, 16).reshape(3, 4, 2, 2).transpose(1, 0, 2, 3).copy(), "Wt"),
             numpy_helper.from_array(_known(5, 192).T.copy(), "Wm"),
             numpy_helper.from_array(_known(7, 5), "Wg1"),
             numpy_helper.from_array(_known(6, 7).T.copy(), "Wg0"),
             numpy_helper.from_array(np.array([0, 192], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "Wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["c", "Wt"], ["t"], name="convt", strides=[2, 2]),
             helper.make_node("Reshape", ["t", "shape"], ["f"], name="flat"),
             helper.make_node("MatMul", ["f", "Wm"], ["m"], name="matmul"),
             helper.make_node("Gemm", ["m", "Wg1"], ["g1"], name="gemm_tb", transB=1),
             helper.make_node("Gemm", ["g1", "Wg0"], ["y"], name="gemm_t0")]
    graph = helper.make_graph(nodes, "known", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


def _table(model):
    layers = model.layers()
    skip = {(l.name, f.name): r for l in layers for f in FORMATS if (r := model.skip_reason(l.name, f))}
    return weight_tables(model, layers, FORMATS, skip), skip


def _check_known(df: pd.DataFrame, outs: dict[str, int], skip: dict) -> None:
    assert list(df.columns[:len(CHANNEL_COLUMNS)]) == CHANNEL_COLUMNS
    assert df.groupby("layer", sort=False).size().to_dict() == outs
    for layer, g in df.groupby("layer", sort=False):
        c = np.arange(outs[layer])
        assert g["channel"].tolist() == c.tolist() and (g["n_channels"] == 1).all()
        np.testing.assert_array_equal(g["max"], c + 1.0, err_msg=layer)
        np.testing.assert_array_equal(g["min"], -(c + 1.0) / 2, err_msg=layer)
        np.testing.assert_array_equal(g["absmax"], c + 1.0, err_msg=layer)
        if (layer, "int8") in skip:
            assert g["step[int8]"].isna().all()
        else:  # the engine's per-channel symmetric step, absmax / 127, in float32 as it computes it
            np.testing.assert_array_equal(g["step[int8]"], (c + 1).astype(np.float32) / np.float32(127))
            # every channel is the same pattern scaled by its own step: the same SQNR on every channel
            assert np.ptp(g["sqnr_db[int8]"]) < 1e-4, layer  # float32 rounding of the scaled values


def test_torch_channel_axis_per_layer_kind():
    """Conv axis 0, ConvTranspose stored axis 1 (grouped: out = g * out/g + j), Linear axis 0."""
    tm = TorchModel(KnownChannels().eval(), torch.zeros(3, 2, 4, 4), name="known", source="test")
    (wsqnr, df), skip = _table(tm)
    _check_known(df, {"conv": 4, "gconvt": 6, "convt": 3, "fc": 5}, skip)
    assert ("gconvt", "int8") in skip  # a grouped ConvTranspose is not per output channel in onnxruntime
    fc = df[df["layer"] == "fc"]
    assert fc["step[int4]"].notna().all() and fc["sqnr_db[int4]"].lt(fc["sqnr_db[int8]"]).all()


def test_onnx_channel_axis_per_op(tmp_path):
    """Conv axis 0, ConvTranspose axis 1, MatMul [in,out] axis 1, Gemm transB=1 axis 0 and transB=0 axis 1."""
    om = load_onnx_model(_known_onnx(tmp_path / "known.onnx"), np.zeros((3, 2, 4, 4), np.float32))
    (wsqnr, df), skip = _table(om)
    _check_known(df, {"conv": 4, "convt": 3, "matmul": 5, "gemm_tb": 7, "gemm_t0": 6}, skip)


def test_channel_sqnr_and_steps_match_the_engine():
    """Per channel: SQNR of that channel under the engine's fake-quantized weight; the whole-weight SQNR is
    unchanged; per-group steps are the largest group step of the channel; per-tensor the tensor's."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 64, generator=g) * torch.tensor([0.1, 0.2, 5.0, 0.1, 0.3, 0.1])[:, None]
    fakes = {f.name: fake_quantize_weight(W, f.weight) for f in FORMATS}
    df = layer_channels("l", W, fakes, {f.name: f.weight for f in FORMATS})
    for c in range(6):
        ref = fake_quantize_weight(W[c:c + 1], WeightSpec(8, True, PerTensor()))
        sig, noise = float((W[c].double() ** 2).sum()), float(((W[c] - ref[0]).double() ** 2).sum())
        assert df["sqnr_db[int8]"][c] == pytest.approx(10 * np.log10(sig / noise), abs=1e-4)  # stored as float32
        groups = W[c].reshape(2, 32)
        lo, hi = groups.amin(1).clamp(max=0), groups.amax(1).clamp(min=0)
        assert df["step[int4]"][c] == pytest.approx(float(((hi - lo) / 15).max()), rel=1e-6)
    np.testing.assert_allclose(df["mean"], W.double().mean(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(df["std"], W.double().std(1, unbiased=False).numpy(), rtol=1e-6)
    tensor = ch.channel_steps(W, WeightSpec(8, True, PerTensor()))
    assert np.all(tensor == np.float32(W.abs().max()) / np.float32(127))


def test_wide_layers_are_summarised():
    """Above ``max_rows``, rows summarise consecutive channels: min of minima, max of maxima, the
    largest step and the lowest SQNR, pooled mean; an outlier channel stays visible."""
    W = torch.from_numpy(_known(10, 8))
    W[7, 3] = 100.0
    fakes = {"int8": fake_quantize_weight(W, INT8.weight)}
    full = layer_channels("l", W, fakes, {"int8": INT8.weight}, max_rows=4)  # span 3: rows of 3, 3, 3, 1
    assert full["channel"].tolist() == [0, 3, 6, 9] and full["n_channels"].tolist() == [3, 3, 3, 1]
    assert full["max"].tolist() == [3.0, 6.0, 100.0, 10.0] and full["min"].tolist() == [-1.5, -3.0, -4.5, -5.0]
    assert full["step[int8]"][2] == pytest.approx(100.0 / 127)
    one = layer_channels("l", W, fakes, {"int8": INT8.weight})
    assert full["sqnr_db[int8]"][2] == one["sqnr_db[int8]"][6:9].min()
    assert full["mean"][1] == pytest.approx(one["mean"][3:6].mean())


def test_rows_per_layer_keep_a_run_bounded():
    assert ch.rows_per_layer(37) == ch.MAX_CHANNEL_ROWS  # MiniLM: every channel of every layer
    assert ch.rows_per_layer(1000) * 1000 <= ch.TOTAL_CHANNEL_ROWS
    assert ch.rows_per_layer(100_000) == ch.MIN_CHANNEL_ROWS


def test_run_writes_channels_and_old_runs_open(digits_run, tmp_path):
    """The sweep writes channels.parquet with the Run; load_run does not read it; a Run without it (older) opens
    and ``read_channels`` says None; a resumed sweep writes it into such a Run; a bundle carries it."""
    df = read_channels(digits_run.path)
    assert set(df["layer"]) == set(digits_run.layer_names)
    shapes = dict(zip(digits_run.layers["name"], digits_run.layers["out_features"]))
    assert df.groupby("layer").size().to_dict() == shapes
    assert "channels" not in load_run(digits_run.path).tables
    one = read_channels(digits_run.path, "fc1")
    assert one["layer"].eq("fc1").all() and one["channel"].tolist() == list(range(shapes["fc1"]))
    # the weight histogram's range is the channels' envelope
    h = digits_run.histograms.set_index(["layer", "tensor"]).loc[("fc1", "weight")]
    assert one["min"].min() == pytest.approx(h["lo"]) and one["max"].max() == pytest.approx(h["hi"])

    old = tmp_path / "old"
    shutil.copytree(digits_run.path, old, ignore=shutil.ignore_patterns("jobs"))
    (old / "channels.parquet").unlink()
    assert load_run(old).status == "complete" and read_channels(old) is None

    bundle = write_bundle(digits_run.path, tmp_path / "d.qlrun")
    opened = open_bundle(bundle, tmp_path / "opened")
    pd.testing.assert_frame_equal(read_channels(opened.path), df)
    open_bundle(write_bundle(old, tmp_path / "old.qlrun"), tmp_path / "old_opened")  # still opens without it


def test_resume_writes_channels_into_a_run_without_them(digits_run, tmp_path):
    from analysis.engine.analyze import sweep_to_run

    run = tmp_path / "resumed"
    shutil.copytree(digits_run.path, run)
    (run / "channels.parquet").unlink()
    sweep_to_run("demo:digits", "digits", run, resume=True, progress=False)
    pd.testing.assert_frame_equal(read_channels(run), read_channels(digits_run.path))


def test_unreadable_channels_file_names_it(digits_run, tmp_path):
    run = tmp_path / "bad"
    shutil.copytree(digits_run.path, run, ignore=shutil.ignore_patterns("jobs"))
    (run / "channels.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(RunError, match="channels.parquet: unreadable Parquet"):
        read_channels(run)
    pd.DataFrame({"layer": ["fc1"], "channel": [0]}).to_parquet(run / "channels.parquet")
    with pytest.raises(RunError, match=r"channels.parquet: column\(s\) n_channels, min"):
        read_channels(run)
    assert load_run(run).status == "complete"  # the Run itself still opens


def test_report_draws_channel_ranges_for_the_most_sensitive_layers(digits_run, tmp_path):
    import json

    from page_script import script

    from analysis.report.render import most_sensitive, render_html

    page = render_html(digits_run)
    figs = json.loads(script(page, "ql-data"))["figures"]
    layers = most_sensitive(digits_run)
    assert {f"fig-chan-{i}" for i in range(len(layers))} <= set(figs)
    assert f'<div id="fig-chan-0"' in page
    fig, rows = figs["fig-chan-0"], read_channels(digits_run.path, layers[0])
    xs = sorted(x for t in fig["data"] for x in t["x"])
    assert xs == rows["channel"].tolist()  # one bar per output channel
    band = sorted(s["y0"] for s in fig["layout"]["shapes"])
    assert band == pytest.approx([-rows["absmax"].max(), rows["absmax"].max()])
    assert fig["layout"]["xaxis"]["title"]["text"] == "output channel"

    old = tmp_path / "old"
    shutil.copytree(digits_run.path, old, ignore=shutil.ignore_patterns("jobs"))
    (old / "channels.parquet").unlink()
    page = render_html(load_run(old))
    assert "fig-chan" not in page


def test_channels_file_is_cut_in_row_groups_a_layer_read_can_skip(digits_run, tmp_path):
    """Rows sorted by layer, in row groups of OPTIONAL_TABLES['channels'] rows: a read of one layer decodes only
    the groups whose statistics can hold it (a 1,000-layer file took 0.5 s a layer in one group, 35 ms so)."""
    import pyarrow.parquet as pq

    from analysis.store.run import OPTIONAL_TABLES, write_optional_table

    run = tmp_path / "many"
    shutil.copytree(digits_run.path, run, ignore=shutil.ignore_patterns("jobs"))
    W = torch.randn(4096, 32, generator=torch.Generator().manual_seed(0))
    frames = [layer_channels(f"layer{i:02d}", W, {}, {}) for i in range(12)]
    df = pd.concat(frames, ignore_index=True)
    write_optional_table(load_run(run), "channels", df)
    meta = pq.ParquetFile(run / "channels.parquet").metadata
    assert meta.num_row_groups == -(-len(df) // OPTIONAL_TABLES["channels"])
    one = read_channels(run, "layer07")
    assert len(one) == 4096 and one["layer"].eq("layer07").all()
    # the engine hands the table over sorted by layer name, which keeps each group's layer range narrow
    (_, table), _ = _table(TorchModel(KnownChannels().eval(), torch.zeros(3, 2, 4, 4), name="known", source="t"))
    assert table["layer"].tolist() == sorted(table["layer"])
