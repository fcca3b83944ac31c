"""int8-dyn end to end: the format, the engine's simulation against the onnxruntime model ``apply`` builds,
skips, sizes, the Run, projection, search and URL tokens.

Parity: the engine (torch pre-hook, or the ONNX probe's DynamicQuantizeLinear) and the runtime
(``quantize_dynamic``: DynamicQuantizeLinear + MatMulInteger) compute with the same integer codes, so
what is left is float rounding in different summation orders: about 1e-6 of the output's scale. The
bound, 1e-4 of the largest output, stays far below one activation step (range / 255 times a weight
column, ~1e-2 of the output here), so a simulation that quantized any other way fails it: the per-row
simulation below is off by more than ten times the bound on the same batch. The int4 paths
(MatMulNBits, blocked DequantizeLinear on a Conv) are held to the same bound.
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from analysis import analyze
from page_script import page_projections, script
from analysis.api import apply_policy, verify_policy
from analysis.models.onnx_graph import find_layers
from analysis.models.onnx_io import bind_input
from analysis.models.onnx_model import load_onnx_model
from analysis.models.torch_model import TorchModel
from analysis.project.projection import Projector
from analysis.project.search import best_policy
from analysis.quant.formats import (DYNAMIC_CONV_REASON, INT8, INT8_DYN, ActivationSpec, QuantFormat, get_format,
                                    with_observer)
from analysis.quant.sizes import layer_bytes
from analysis.models.base import LayerInfo
from analysis.report.render import render_html
from analysis.runtime.latency import session
from analysis.runtime.onnx_quantize import QuantizeError, quantize_model
from analysis.runtime.session import export_torch
from analysis.store.policy import (FORMAT_CODE, POLICY_FORMATS, Policy, decode_codes, decode_url_token, encode_codes,
                                   encode_url_token, match_policy)

TOL = 1e-4  # of the largest output; see the module docstring


# ---- the format ----------------------------------------------------------------------------------

def test_format_round_trips_and_older_specs_load_static():
    assert QuantFormat.from_dict(INT8_DYN.to_dict()) == INT8_DYN
    assert INT8_DYN.to_dict()["activation"]["dynamic"] is True and INT8_DYN.is_dynamic
    assert "dynamic" not in INT8.to_dict()["activation"]  # static specs read as older Runs wrote them
    old = {"name": "int8", "description": "W8A8", "activation": {"bits": 8, "symmetric": False, "observer": "minmax"},
           "weight": {"bits": 8, "symmetric": True, "granularity": {"axis": 0, "kind": "per_channel"}}}
    assert QuantFormat.from_dict(old).activation == ActivationSpec(8, False, "minmax", dynamic=False)
    assert with_observer(INT8_DYN, "mse") == INT8_DYN  # nothing to calibrate
    assert get_format("int8-dyn") is INT8_DYN and POLICY_FORMATS[3] == "int8-dyn"


def test_dynamic_activations_are_asymmetric_8_bit():
    with pytest.raises(ValueError, match="asymmetric 8-bit"):
        ActivationSpec(4, dynamic=True)
    with pytest.raises(ValueError, match="asymmetric 8-bit"):
        ActivationSpec(8, symmetric=True, dynamic=True)


def test_bytes_worked_out_by_hand():
    # 192 codes + 3 channel scales x 4 + 3 int8 zero points (quantize_dynamic stores them) + 3 bias x 4, no activation
    assert layer_bytes(LayerInfo("fc", "Linear", 0, (3, 64), True, 195, 192, 64, 3), INT8_DYN) == 219


# ---- single-layer models -------------------------------------------------------------------------

def _model(nodes, inits, x_shape, y_shape) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *y_shape])],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def matmul_3d() -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """x (N, 5, 64) -> MatMul(W 64x32) -> Add(b): a transformer's Linear as torch exports it."""
    rng = np.random.default_rng(0)
    inits = {"W": rng.normal(0, 0.2, (64, 32)).astype(np.float32), "b": rng.normal(0, 0.1, 32).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"), helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    return _model(nodes, inits, (5, 64), (5, 32)), (5, 64)


def gemm() -> tuple[onnx.ModelProto, tuple[int, ...]]:
    rng = np.random.default_rng(1)
    inits = {"W": rng.normal(0, 0.2, (32, 64)).astype(np.float32), "b": rng.normal(0, 0.1, 32).astype(np.float32)}
    return _model([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)], inits, (64,), (32,)), (64,)


def conv() -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """K = 8 x 2 x 2 = 32: one int4 block per output channel."""
    rng = np.random.default_rng(2)
    inits = {"W": rng.normal(0, 0.2, (16, 8, 2, 2)).astype(np.float32), "b": rng.normal(0, 0.1, 16).astype(np.float32)}
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv")
    return _model([node], inits, (8, 6, 6), (16, 5, 5)), (8, 6, 6)


def _batch(shape: tuple[int, ...], seed: int = 3) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0, 1, (8, *shape)).astype(np.float32)
    x[0] *= 4.0  # one sample with a wider range: per-tensor and per-row scales differ
    return x


def _runtime(model: onnx.ModelProto, policy: dict[str, str], x: np.ndarray, input_name: str = "x") -> tuple[np.ndarray, dict]:
    binding = bind_input(model, tuple(x.shape[1:]), "test")
    q = quantize_model(model, find_layers(model), policy, binding, x)
    return session(q.model, threads=1).run(None, {input_name: x})[0], q.kernels


def _agreement(engine: np.ndarray, runtime: np.ndarray) -> tuple[float, float]:
    cos = float(engine.ravel() @ runtime.ravel() / (np.linalg.norm(engine) * np.linalg.norm(runtime)))
    return cos, float(np.abs(engine - runtime).max())


@pytest.mark.parametrize("build, fmt, kernel", [
    (matmul_3d, "int8-dyn", "MatMulInteger (dynamic)"),
    (gemm, "int8-dyn", "MatMulInteger (dynamic)"),
    (matmul_3d, "int4", "MatMulNBits"),
    (conv, "int4", "DequantizeLinear(uint4, blocked) + Conv"),
])
def test_onnx_engine_matches_the_runtime_model(build, fmt, kernel, tmp_path):
    model, shape = build()
    onnx.save(model, tmp_path / "one.onnx")
    x = _batch(shape)
    om = load_onnx_model(tmp_path / "one.onnx", torch.from_numpy(x))
    (layer,) = [l.name for l in om.layers()]
    engine = om.run(x, {layer: fmt}).numpy()
    runtime, kernels = _runtime(model, {layer: fmt}, x)
    assert kernels == {layer: kernel}
    cos, err = _agreement(engine, runtime)
    assert cos >= 0.9999 and err <= TOL * np.abs(runtime).max(), (cos, err)
    assert np.abs(om.run(x).numpy() - runtime).max() > 10 * err  # the quantized model differs from FP32


def test_dynamic_scales_are_per_tensor_not_per_row(tmp_path):
    """One scale over the whole (N, 5, 64) input, as onnxruntime's DynamicQuantizeLinear computes it."""
    model, shape = matmul_3d()
    x = _batch(shape)
    runtime, _ = _runtime(model, {"mm": "int8-dyn"}, x)
    W, b = (numpy_helper.to_array(t) for t in model.graph.initializer)
    w_scale = np.abs(W).max(axis=0) / 127
    W_q = np.clip(np.round(W / w_scale), -127, 127) * w_scale

    def fake(v: np.ndarray) -> np.ndarray:
        lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
        scale = np.float32((hi - lo) / 255)
        zero = np.clip(np.round(-lo / scale), 0, 255)
        return (np.clip(np.round(v / scale) + zero, 0, 255) - zero) * scale

    per_tensor = fake(x) @ W_q + b
    per_row = np.stack([np.stack([fake(row) for row in sample]) for sample in x]) @ W_q + b
    bound = TOL * np.abs(runtime).max()
    assert np.abs(per_tensor - runtime).max() <= bound
    assert np.abs(per_row - runtime).max() > 10 * bound


class LinearReluLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("fmt, kernel", [("int8-dyn", "MatMulInteger (dynamic)"), ("int4", "MatMulNBits")])
@pytest.mark.parametrize("shape", [(64,), (7, 64)], ids=["2d-gemm", "3d-matmul"])
def test_torch_engine_matches_the_runtime_model(fmt, kernel, shape):
    module = LinearReluLinear().eval()
    x = torch.from_numpy(_batch(shape))
    tm = TorchModel(module, x, name="lrl", source="test")
    engine = tm.run(x, {"fc1": fmt, "fc2": fmt}).numpy()
    exported = export_torch(module, x[:2])
    layers = find_layers(exported)
    runtime, kernels = _runtime(exported, {l.name: fmt for l in layers}, x.numpy(), "input")
    assert set(kernels.values()) == {kernel}
    cos, err = _agreement(engine, runtime)
    assert cos >= 0.9999 and err <= TOL * np.abs(runtime).max(), (cos, err)


# ---- what cannot take it ---------------------------------------------------------------------------

def test_convolutions_are_skipped_with_the_reason(tmp_path):
    model, shape = conv()
    onnx.save(model, tmp_path / "conv.onnx")
    x = _batch(shape)
    assert load_onnx_model(tmp_path / "conv.onnx", torch.from_numpy(x)).skip_reason("conv", INT8_DYN) == DYNAMIC_CONV_REASON
    net = nn.Sequential(nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 3))
    tm = TorchModel(net, torch.from_numpy(x), name="net", source="test")
    assert tm.skip_reason("0", INT8_DYN) == DYNAMIC_CONV_REASON and tm.skip_reason("2", INT8_DYN) is None
    with pytest.raises(QuantizeError, match="convolutions take static int8"):
        _runtime(model, {"conv": "int8-dyn"}, x)


def test_a_gemm_that_cannot_run_as_matmul_is_skipped(tmp_path):
    model, shape = gemm()
    model.graph.node[0].attribute.append(helper.make_attribute("alpha", 0.5))
    onnx.save(model, tmp_path / "gemm.onnx")
    om = load_onnx_model(tmp_path / "gemm.onnx", torch.from_numpy(_batch(shape)))
    assert "alpha=1" in om.skip_reason("fc", INT8_DYN)
    assert om.skip_reason("fc", INT8) is None


def test_a_tensor_read_by_a_static_and_a_dynamic_layer_is_quantized_at_run_time_for_the_dynamic_one():
    """quantize_dynamic reuses, by tensor name, a static QuantizeLinear of the same input (fixed scale)."""
    rng = np.random.default_rng(4)
    inits = {"W1": rng.normal(0, 0.2, (64, 32)).astype(np.float32), "W2": rng.normal(0, 0.2, (64, 32)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="static"),
             helper.make_node("MatMul", ["x", "W2"], ["b"], name="dynamic"),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    model = _model(nodes, inits, (64,), (32,))
    x = _batch((64,))
    q = quantize_model(model, find_layers(model), {"static": "int8", "dynamic": "int8-dyn"},
                       bind_input(model, (64,), "test"), x)
    producer = {o: n for n in q.model.graph.node for o in n.output}
    (mmi,) = [n for n in q.model.graph.node if n.op_type == "MatMulInteger"]
    assert producer[mmi.input[0]].op_type == "DynamicQuantizeLinear"
    assert q.kernels == {"static": "QLinearMatMul (static QOperator)", "dynamic": "MatMulInteger (dynamic)"}


# ---- a Run, its projection, search and tokens ----------------------------------------------------

@pytest.fixture(scope="module")
def dyn_run(tmp_path_factory):
    """The digits CNN (four Conv2d, three Linear) at int8, int4 and int8-dyn."""
    return analyze("demo:digits", "digits", tmp_path_factory.mktemp("dyn") / "run", formats=["int8", "int4", "int8-dyn"],
                   progress=False, latency=False, verify_policies=0, random_policies=4)


def test_run_measures_int8_dyn_and_skips_convolutions(dyn_run):
    sens = dyn_run.sensitivity[dyn_run.sensitivity["format"] == "int8-dyn"].set_index("layer")
    linear = dyn_run.layers.loc[dyn_run.layers["type"] == "Linear", "name"].tolist()
    convs = dyn_run.layers.loc[dyn_run.layers["type"] == "Conv2d", "name"].tolist()
    assert linear and convs and dyn_run.formats == ["int8", "int4", "int8-dyn"]
    assert (sens.loc[linear, "status"] == "ok").all()
    assert (sens.loc[convs, "status"] == "skipped").all() and set(sens.loc[convs, "reason"]) == {DYNAMIC_CONV_REASON}
    assert dyn_run.meta["uniform"]["int8-dyn"]["skipped_layers"] == sorted(convs)
    assert dyn_run.meta["format_specs"]["int8-dyn"]["activation"]["dynamic"] is True
    clip = dyn_run.clipping[dyn_run.clipping["format"] == "int8-dyn"]
    assert set(clip["tensor"]) == {"weight"}  # no calibrated input range
    cost = dyn_run.cost[dyn_run.cost["format"] == "int8-dyn"]
    assert sorted(cost["layer"]) == sorted(linear)


def test_projection_search_and_tokens_take_code_3(dyn_run):
    p = Projector(dyn_run)
    names, dyn = p.names, FORMAT_CODE["int8-dyn"]
    linear = set(dyn_run.layers.loc[dyn_run.layers["type"] == "Linear", "name"])
    assert p.formats == ["fp32", "int8", "int4", "int8-dyn"]
    assert [bool(p.allowed[i, dyn]) for i in range(len(names))] == [n in linear for n in names]
    codes = np.array([dyn if n in linear else 0 for n in names], dtype=np.int8)
    assert p.project(codes).bytes == p.other_bytes + sum(int(p.bytes[i, c]) for i, c in enumerate(codes))
    policy = Policy(dyn_run.model_sha256, {n: "int8-dyn" for n in linear})
    token = encode_url_token(policy, dyn_run)
    back = decode_url_token(token, dyn_run)
    assert back.clean and back.codes.tolist() == codes.tolist()
    assert {n: f for n, f in back.applied.items() if f != "fp32"} == dict(policy.layers)
    # search may pick int8-dyn, never for a convolution
    r = best_policy(p, max_bytes=p.fp32_bytes * 0.5)
    assert all(n in linear for n, c in zip(names, r.codes) if c == dyn)


def test_older_tokens_decode_unchanged_and_a_run_without_int8_dyn_never_offers_it(digits_run):
    assert encode_codes([0, 1, 2], "ab" * 32) == "q1.abababababab.3.JA"  # as written before int8-dyn
    assert decode_codes("q1.abababababab.3.JA").codes.tolist() == [0, 1, 2]
    assert "int8-dyn" not in digits_run.formats
    p = Projector(digits_run)
    assert not p.allowed[:, FORMAT_CODE["int8-dyn"]].any() and "int8-dyn" not in p.formats
    m = match_policy(Policy(digits_run.model_sha256, {digits_run.layer_names[-1]: "int8-dyn"}), digits_run)
    assert "not measured" in m.unavailable[digits_run.layer_names[-1]] and m.codes[-1] == 0


def test_apply_and_verify_run_dynamic_int8(dyn_run, tmp_path):
    linear = dyn_run.layers.loc[dyn_run.layers["type"] == "Linear", "name"].tolist()
    policy = {"schema": "quantlens.policy/1", "model": {"sha256": dyn_run.model_sha256}, "default": "fp32",
              "layers": {n: "int8-dyn" for n in linear}}
    applied = apply_policy(dyn_run, policy, tmp_path / "dyn.onnx")
    assert applied.kernels == {n: "MatMulInteger (dynamic)" for n in linear}
    # the file holds int8 codes, a scale and an int8 zero point per channel, and the fp32 bias: what the cost counts
    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "dyn.onnx").graph.initializer}
    stored = sum(a.nbytes for n, a in init.items() if n.endswith(("_quantized", "_scale", "_zero_point")))
    lay = dyn_run.layers.set_index("name").loc[linear]
    bias = int((lay["params"] - lay["in_features"] * lay["out_features"]).sum())
    cost = dyn_run.cost.set_index(["layer", "format"])["bytes"]
    assert stored + 4 * bias == sum(int(cost[(n, "int8-dyn")]) for n in linear)
    row = verify_policy(dyn_run, policy, repeats=3)
    assert row["metric"] == pytest.approx(dyn_run.meta["uniform"]["int8-dyn"]["metric"], abs=0.01)




def _options(page: str, layer: str) -> list[str]:
    """The ``<option>`` tags of a layer's format select in the report."""
    select = re.search(rf'<select class="ql-fmt"[^>]*aria-label="format of {re.escape(layer)}">(.*?)</select>', page).group(1)
    return re.findall(r"<option [^>]*>", select)


def test_report_offers_int8_dyn_where_measured_and_projects_it_as_python_does(dyn_run, digits_run, tmp_path):
    page = render_html(dyn_run)
    assert 'data-all="int8-dyn"' in page
    assert [o for o in _options(page, "fc1") if "int8-dyn" in o] == ['<option value="int8-dyn">']
    assert [o for o in _options(page, "conv1") if "int8-dyn" in o] == ['<option value="int8-dyn" disabled>']
    old = render_html(digits_run)
    assert 'data-all="int8-dyn"' not in old and not any("int8-dyn" in o for o in _options(old, "fc1"))
    if shutil.which("node") is None:
        return
    p = Projector(dyn_run)
    rng = np.random.default_rng(0)
    policies = [[int(rng.choice(np.flatnonzero(p.allowed[i]))) for i in range(len(p.names))] for _ in range(50)]
    out = page_projections(page, policies, tmp_path)
    assert any(FORMAT_CODE["int8-dyn"] in c for c in policies)
    for codes, js in zip(policies, out):
        py = p.project(np.array(codes))
        assert js["bytes"] == py.bytes and js["metric"] == pytest.approx(py.metric, abs=1e-9)
