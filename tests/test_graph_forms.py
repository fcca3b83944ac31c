"""Graphs as they come: layers inside ``If`` / ``Loop`` subgraphs (listed as not analysed, while the top-level
layers are analysed, applied and verified), ``ConvTranspose`` in ONNX and torch, grouped and depthwise
convolutions and Conv1d. Engine-vs-onnxruntime parity for the convolution kinds: tests/test_parity_static_int8.py."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from analysis.api import analyze, apply_policy, verify_policy
from analysis.errors import ModelError
from analysis.models.onnx_graph import downstream_tensors, find_layers, name_nodes, subgraph_layers
from analysis.models.onnx_io import bind_input
from analysis.models.onnx_model import OnnxModel
from analysis.models.torch_model import TorchModel
from analysis.quant.formats import get_format
from analysis.quant.primitives import fake_quantize_weight, swap_transposed_conv_layout
from analysis.runtime.onnx_quantize import QuantizeError, quantize_model
from test_parity_static_int8 import _calibrate, _quantizers

torch.set_num_threads(1)
D = 32  # features: int4's groups of 32 divide every layer's K
WHERE = "inside the 'then_branch' of If node 'branch'"


def _w(rng, *shape, std=0.2):
    return rng.normal(0, std, shape).astype(np.float32)


def _value(name, *shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *shape])


def _model(nodes, inits: dict, x_shape=(D,), y_shape=(10,), opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "forms", [_value("x", *x_shape)], [_value("y", *y_shape)],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _true_for_any_batch(src: str) -> list[onnx.NodeProto]:
    """cond = Size(src) > 0, computed at run time (a constant condition could be folded away)."""
    return [helper.make_node("Size", [src], ["n"], name="size"),
            helper.make_node("Greater", ["n", "zero"], ["cond"], name="nonempty")]


def if_model(*, top_level: bool = True, shared_weight: bool = False) -> onnx.ModelProto:
    """x -> gemm1 -> h; If(x not empty): then ``sub_gemm`` (Gemm on h, read from the outer scope), else Relu(h);
    -> s -> gemm2 -> y. ``shared_weight``: sub_gemm uses gemm1's weight, also read from the outer scope.
    ``top_level=False``: no gemm1 / gemm2; the branches read x, sub_gemm is the only layer."""
    rng = np.random.default_rng(5)
    src = "h" if top_level else "x"
    sub_w = "W1" if shared_weight else "Wt"
    then_inits = [] if shared_weight else [numpy_helper.from_array(_w(rng, D, D), "Wt")]
    then_g = helper.make_graph([helper.make_node("Gemm", [src, sub_w, "bt"], ["t_out"], name="sub_gemm", transB=1)],
                               "then", [], [_value("t_out", D)],
                               then_inits + [numpy_helper.from_array(_w(rng, D, std=0.1), "bt")])
    else_g = helper.make_graph([helper.make_node("Relu", [src], ["e_out"], name="sub_relu")], "else", [],
                              [_value("e_out", D)])
    branch = helper.make_node("If", ["cond"], ["s"], name="branch", then_branch=then_g, else_branch=else_g)
    inits = {"zero": np.array(0, np.int64), "W1": _w(rng, D, D), "b1": _w(rng, D, std=0.1),
             "W2": _w(rng, 10, D), "b2": _w(rng, 10, std=0.1)}
    if not top_level:
        return _model([*_true_for_any_batch("x"), branch, helper.make_node("Identity", ["s"], ["y"], name="out")],
                      {"zero": inits["zero"]}, y_shape=(D,))
    return _model([helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="gemm1", transB=1),
                   *_true_for_any_batch("x"), branch,
                   helper.make_node("Gemm", ["s", "W2", "b2"], ["y"], name="gemm2", transB=1)], inits)


def loop_model() -> onnx.ModelProto:
    """x -> mm -> h; Loop (2 trips) whose body holds an unnamed MatMul and an If with a Gemm: layers two deep."""
    rng = np.random.default_rng(6)
    inner = helper.make_node("If", ["c_in"], ["v2"], name="inner", then_branch=helper.make_graph(
        [helper.make_node("Gemm", ["v1", "Wi"], ["g"], name="deep_gemm", transB=1)], "deep", [], [_value("g", D)],
        [numpy_helper.from_array(_w(rng, D, D), "Wi")]), else_branch=helper.make_graph(
        [helper.make_node("Identity", ["v1"], ["e"], name="deep_id")], "deep_else", [], [_value("e", D)]))
    body = helper.make_graph(
        [helper.make_node("MatMul", ["v_in", "Wb"], ["v1"]), inner,
         helper.make_node("Identity", ["c_in"], ["c_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []), _value("v_in", D)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), _value("v2", D)],
        [numpy_helper.from_array(_w(rng, D, D), "Wb")])
    return _model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                   helper.make_node("Loop", ["trips", "go", "h"], ["v"], name="loop", body=body),
                   helper.make_node("MatMul", ["v", "Wo"], ["y"], name="head")],
                  {"W": _w(rng, D, D), "trips": np.array(2, np.int64), "go": np.array(True),
                   "Wo": _w(rng, D, 10)})


def _data(n=96, seed=1):
    return np.random.default_rng(seed).normal(0, 1, (n, D)).astype(np.float32)


def _engine(model, x) -> OnnxModel:
    return OnnxModel(model, bind_input(model, tuple(x.shape[1:]), "t"), x[:2], name="t", source="t.onnx", sha256="")


def _session_outputs(model: onnx.ModelProto, x: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
    """The named tensors (graph outputs by default) of ``model`` run on ``x`` in onnxruntime, one thread."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in set(names or []) - {o.name for o in m.graph.output}:
        m.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(names, {"x": x})


def _session_output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return _session_outputs(model, x)[0]


def _branch_ops(model: onnx.ModelProto) -> list[str]:
    node = next(n for n in model.graph.node if n.op_type == "If")
    then = next(a.g for a in node.attribute if a.name == "then_branch")
    return [n.op_type for n in then.node]


# ---- subgraphs -----------------------------------------------------------------------------------------


def test_layers_in_subgraphs_are_listed_with_where_they_sit():
    model = if_model()
    assert [l.name for l in find_layers(model)] == ["gemm1", "gemm2"]
    assert subgraph_layers(model) == [("sub_gemm", f"{WHERE}: layers in subgraphs are not analysed")]
    engine = _engine(model, _data())
    assert engine.not_analysed == subgraph_layers(model)
    assert [l.name for l in engine.layers()] == ["gemm1", "gemm2"]


def test_nested_subgraph_layers_are_named_and_placed():
    model = loop_model()
    assert name_nodes(model) == 2  # the body's unnamed MatMul and Identity
    body = next(a.g for a in model.graph.node[1].attribute if a.name == "body")
    assert [n.name for n in body.node] == ["loop/body/MatMul_0", "inner", "loop/body/Identity_2"]
    assert subgraph_layers(model) == [
        ("loop/body/MatMul_0", "inside the 'body' of Loop node 'loop': layers in subgraphs are not analysed"),
        ("deep_gemm", "inside the 'then_branch' of If node 'inner', within the 'body' of Loop node 'loop': "
                      "layers in subgraphs are not analysed")]
    x = _data()
    engine = _engine(model, x)
    assert [l.name for l in engine.layers()] == ["mm", "head"]
    assert engine.reaches_output() == {"mm": True, "head": True}  # mm's output reaches y only through the Loop
    np.testing.assert_allclose(engine.run(x).numpy(), _session_output(model, x), rtol=1e-5, atol=1e-5)


def test_a_layer_read_only_inside_a_subgraph_reaches_the_output():
    model = if_model()
    assert "y" in downstream_tensors(model, "h")  # h has no top-level reader: only the If's branches read it
    assert _engine(model, _data()).reaches_output() == {"gemm1": True, "gemm2": True}


@pytest.mark.parametrize("shared_weight", [False, True], ids=["own-weight", "outer-weight"])
def test_outer_scope_reads_see_the_quantized_layer_output(shared_weight):
    """The probe renames gemm1's output and re-creates ``h`` behind its switch, so the branch reading ``h`` sees
    it requantized, as the built model's branch does (it reads ``h`` dequantized from QGemm's uint8 output).
    With ``shared_weight`` the branch also reads gemm1's weight initializer, which both must keep."""
    model = if_model(shared_weight=shared_weight)
    x, calib = _data(48, seed=2), _data(64, seed=3)
    engine = _engine(model, calib)
    _calibrate(engine, calib)
    policy = {"gemm1": "int8"}
    q = quantize_model(model, engine._olayers, policy, engine.binding, calib, _quantizers(engine, ["gemm1"]))
    assert q.kernels == {"gemm1": "QGemm (static QOperator)"}
    assert _branch_ops(q.model) == ["Gemm"]  # the branch's layer stays float
    oq = engine.out_quant[("gemm1", "int8")]
    step, zero = float(oq.scale), int(oq.zero)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    then = next(a.g for a in model.graph.node[3].attribute if a.name == "then_branch")
    inits.update({t.name: numpy_helper.to_array(t) for t in then.initializer})
    W_sub = inits["W1" if shared_weight else "Wt"]
    sides = {"engine": engine.run_outputs(x, ["h", "s", "y"], policy),
             "runtime": _session_outputs(q.model, x, ["h", "s", "y"])}
    for side, (h, s, _) in sides.items():
        codes = h / step + zero
        assert np.abs(codes - np.round(codes)).max() < 1e-3, side  # h as the branch reads it: requantized
        np.testing.assert_allclose(s, h @ W_sub.T + inits["bt"], rtol=1e-5, atol=1e-5, err_msg=side)
    (h_e, _, y_e), (h_r, _, y_r) = sides["engine"], sides["runtime"]
    assert np.abs(h_e - h_r).max() <= step * (1 + 1e-5)  # a value on a rounding boundary may take the next code
    a, b = y_e.astype(np.float64), y_r.astype(np.float64)
    assert ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min() >= 0.9999


def test_a_model_with_layers_only_in_subgraphs_is_refused_in_one_line():
    with pytest.raises(ModelError) as e:
        _engine(if_model(top_level=False), _data())
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == ("t.onnx: no quantizable layers outside subgraphs; the 1 found are inside them, which are not "
                   f"analysed (first: 'sub_gemm', {WHERE})")


def test_int4_leaves_subgraph_matmuls_alone():
    """onnxruntime's 4-bit quantizer walks subgraphs: the Loop body's MatMul (K=32) must stay float."""
    model = loop_model()
    name_nodes(model)
    x = _data()
    q = quantize_model(model, find_layers(model), {"mm": "int4", "head": "int4"}, bind_input(model, (D,), "t"), x)
    assert q.kernels == {"mm": "MatMulNBits", "head": "MatMulNBits"}
    loop = next(n for n in q.model.graph.node if n.op_type == "Loop")
    assert [n.op_type for n in loop.attribute[0].g.node] == ["MatMul", "If", "Identity"]
    _session_output(q.model, x)  # and it runs


def test_analyze_apply_and_verify_a_model_with_an_if(tmp_path):
    onnx.save(if_model(), tmp_path / "branchy.onnx")
    np.savez(tmp_path / "d.npz", inputs=_data(128, seed=4))
    run = analyze(str(tmp_path / "branchy.onnx"), str(tmp_path / "d.npz"), tmp_path / "run", latency=False,
                  verify_policies=0, progress=False, formats="int8,int4", random_policies=0)
    assert run.meta["model"]["not_analysed"] == [
        {"layer": "sub_gemm", "reason": f"{WHERE}: layers in subgraphs are not analysed"}]
    assert run.layer_names == ["gemm1", "gemm2"]
    assert set(run.sensitivity["status"]) == {"ok"}
    policy = {"schema": "quantlens.policy/1", "model": {"sha256": run.model_sha256}, "default": "int8",
              "layers": {"gemm2": "int4"}}
    applied = apply_policy(run, policy, tmp_path / "q.onnx")
    assert applied.kernels == {"gemm1": "QGemm (static QOperator)", "gemm2": "MatMulNBits"}
    built = onnx.load(str(tmp_path / "q.onnx"))
    assert _branch_ops(built) == ["Gemm"]
    assert _session_output(built, _data(4)).shape == (4, 10)
    row = verify_policy(run, policy, repeats=0, name="mixed")
    assert row["kernels"] == applied.kernels
    assert np.isfinite(row["metric"])


# ---- ConvTranspose ---------------------------------------------------------------------------------------


def convtranspose_model(groups: int = 2) -> onnx.ModelProto:
    """x (16, 5, 5) -> ConvTranspose (stored weight 16 x 4/groups... x 2 x 2, stride 2) -> y (8, 10, 10)."""
    rng = np.random.default_rng(8)
    return _model([helper.make_node("ConvTranspose", ["x", "W", "b"], ["y"], name="up", strides=[2, 2], group=groups)],
                  {"W": _w(rng, 16, 8 // groups, 2, 2), "b": _w(rng, 8, std=0.1)}, x_shape=(16, 5, 5),
                  y_shape=(8, 10, 10))


@pytest.mark.parametrize("groups", [1, 2])
def test_onnx_convtranspose_is_a_layer_in_the_engine_layout(groups):
    model = convtranspose_model(groups)
    x = np.random.default_rng(0).normal(0, 1, (8, 16, 5, 5)).astype(np.float32)
    engine = _engine(model, x)
    (info,) = engine.layers()
    stored = numpy_helper.to_array(model.graph.initializer[0])
    assert (info.type, info.weight_shape, info.out_features) == ("ConvTranspose", (8, 16 // groups, 2, 2), 8)
    assert info.in_features == 16 // groups * 4
    assert info.macs == 16 * 5 * 5 * (8 // groups) * 4  # each input element meets out/groups * kernel weights
    assert np.array_equal(engine.weight("up").numpy(), swap_transposed_conv_layout(stored, groups))
    assert engine.skip_reason("up", get_format("int4")) is None
    int8_reason = engine.skip_reason("up", get_format("int8"))
    if groups == 1:
        assert int8_reason is None
    else:
        assert "grouped ConvTranspose" in int8_reason
        with pytest.raises(QuantizeError, match="layer 'up' cannot take int8: onnxruntime quantizes a grouped"):
            quantize_model(model, engine._olayers, {"up": "int8"}, engine.binding, x)
    assert "dynamic int8 runs MatMul/Gemm only" in engine.skip_reason("up", get_format("int8-dyn"))


class Upsampler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.conv = nn.Conv2d(8, 4, 3, padding=1)
        self.unused = nn.Linear(4, 4)  # never called: listed as not analysed

    def forward(self, x):
        return self.conv(torch.relu(self.up(x))).flatten(1)


def upsampler() -> nn.Module:
    return Upsampler()


def test_torch_convtranspose_is_a_layer_in_the_engine_layout():
    x = torch.randn(4, 16, 5, 5)
    tm = TorchModel(upsampler(), x, name="u", source="u")
    up = tm.layer("up")
    assert (up.type, up.weight_shape, up.in_features, up.out_features) == ("ConvTranspose2d", (8, 16, 2, 2), 64, 8)
    assert up.macs == 16 * 5 * 5 * 8 * 4
    assert tm.not_analysed == [("unused", "did not run on the task's inputs")]
    W = tm.modules["up"].weight.detach().clone()
    assert torch.equal(tm.weight("up"), W.transpose(0, 1))
    expected = fake_quantize_weight(W.transpose(0, 1), get_format("int8").weight)  # per output channel
    assert torch.equal(tm.fake_weight("up", get_format("int8")), expected)
    _calibrate(tm, x.numpy())
    with tm.quantized({"up": "int8"}):
        assert torch.equal(tm.modules["up"].weight, expected.transpose(0, 1))  # fed back as stored
    assert torch.equal(tm.modules["up"].weight, W)
    grouped = TorchModel(nn.Sequential(nn.ConvTranspose2d(16, 8, 2, groups=2)), x, name="g", source="g")
    assert "grouped ConvTranspose" in grouped.skip_reason("0", get_format("int8"))


def test_analyze_and_apply_a_torch_convtranspose(tmp_path):
    np.savez(tmp_path / "d.npz", inputs=np.random.default_rng(2).normal(0, 1, (64, 16, 5, 5)).astype(np.float32))
    run = analyze("test_graph_forms:upsampler", str(tmp_path / "d.npz"), tmp_path / "run", latency=False,
                  verify_policies=0, progress=False, formats="int8,int4", random_policies=0)
    assert run.layer_names == ["up", "conv"]
    assert run.meta["model"]["not_analysed"] == [{"layer": "unused", "reason": "did not run on the task's inputs"}]
    status = run.sensitivity.set_index(["layer", "format"])["status"]
    assert status[("up", "int8")] == status[("up", "int4")] == "ok"
    policy = {"schema": "quantlens.policy/1", "model": {"sha256": run.model_sha256}, "default": "int8",
              "layers": {"up": "int4"}}
    assert apply_policy(run, policy).kernels == {"up": "DequantizeLinear(uint4, blocked) + ConvTranspose",
                                                 "conv": "QLinearConv (static QOperator)"}
    policy["layers"] = {}
    assert apply_policy(run, policy).kernels == {"up": "ConvTranspose (static QDQ)",
                                                 "conv": "QLinearConv (static QOperator)"}


# ---- grouped, depthwise and 1-d convolutions ---------------------------------------------------------------


@pytest.mark.parametrize("x_shape,w_shape,groups", [((8, 6, 6), (12, 4, 3, 3), 2), ((8, 6, 6), (8, 1, 3, 3), 8),
                                                    ((8, 20), (6, 8, 3), 1)], ids=["grouped", "depthwise", "conv1d"])
def test_grouped_depthwise_and_1d_convolutions_are_layers(x_shape, w_shape, groups):
    rng = np.random.default_rng(9)
    pads = [1] * (2 * (len(x_shape) - 1))
    out_spatial = x_shape[1:]
    model = _model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv", group=groups, pads=pads)],
                   {"W": _w(rng, *w_shape)}, x_shape=x_shape, y_shape=(w_shape[0], *out_spatial))
    (layer,) = find_layers(model)
    assert layer.groups == groups
    engine = _engine(model, rng.normal(0, 1, (4, *x_shape)).astype(np.float32))
    (info,) = engine.layers()
    k = int(np.prod(w_shape[1:]))
    assert (info.weight_shape, info.in_features, info.macs) == (w_shape, k, w_shape[0] * int(np.prod(out_spatial)) * k)
    err = (engine.weight("conv") - engine.fake_weight("conv", get_format("int8"))).abs().reshape(w_shape[0], -1)
    step = engine.weight("conv").abs().reshape(w_shape[0], -1).amax(1) / 127  # one scale per output channel
    assert bool((err.amax(1) <= step / 2 + 1e-7).all())
