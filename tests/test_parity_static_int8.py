"""Static int8 parity: the engine's fake-quant computes what onnxruntime runs for the model ``apply`` builds.

Both sides quantize the same places (input, weight, and the output static QOperator kernels requantize;
ConvTranspose, which has no QOperator form, through QDQ around a float kernel) with the same quantizers
(the engine's, handed to onnxruntime). Acceptance, per layer kind (grouped, depthwise, 1-d and transposed
convolutions among them) and for two-layer chains: cosine >= 0.9999 and max |error| within one step of the
last output quantizer. int4 (weights only, blocked ``DequantizeLinear`` in front of the float kernel for
convolutions) must match to float rounding.
"""
from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from analysis.engine.analyze import sweep_to_run
from analysis.engine.stats import calibrate
from analysis.models.onnx_graph import find_layers
from analysis.models.onnx_io import bind_input
from analysis.models.onnx_model import OnnxModel
from analysis.models.torch_model import TorchModel
from analysis.quant.formats import get_format
from analysis.runtime.onnx_quantize import quantize_model, static_quantizers
from analysis.runtime.session import export_torch, map_to_torch
from analysis.runtime.verify import apply_policy

COSINE_FLOOR = 0.9999
STEP_SLACK = 1 + 1e-5  # a value on a rounding boundary may take the neighbouring code: one step, in float32


def _graph(nodes, x_shape, inits, opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "parity", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)],
                                                               ir_version=8))


def _w(rng, *shape, std=0.3):
    return rng.normal(0, std, shape).astype(np.float32)


def onnx_conv(rng):
    return _graph([helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])], (3, 8, 8),
                  {"W": _w(rng, 8, 3, 3, 3), "b": _w(rng, 8, std=0.1)}), (3, 8, 8)


def onnx_gemm(rng):
    return _graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="gemm", transB=1)], (32,),
                  {"W": _w(rng, 16, 32), "b": _w(rng, 16, std=0.1)}), (32,)


def onnx_matmul_3d(rng):
    return _graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")], (6, 32),
                  {"W": _w(rng, 32, 16)}), (6, 32)


def onnx_chain_direct(rng):
    """int8 -> int8: the first layer's output is the second one's input, one tensor in onnxruntime."""
    return _graph([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
                   helper.make_node("Gemm", ["h", "W2", "b2"], ["y"], name="gemm2", transB=1)], (32,),
                  {"W1": _w(rng, 32, 24, std=0.2), "W2": _w(rng, 16, 24), "b2": _w(rng, 16, std=0.1)}), (32,)


def onnx_conv_grouped(rng):
    return _graph([helper.make_node("Conv", ["x", "W", "b"], ["y"], name="gconv", group=2, pads=[1, 1, 1, 1])],
                  (8, 8, 8), {"W": _w(rng, 12, 4, 3, 3), "b": _w(rng, 12, std=0.1)}), (8, 8, 8)


def onnx_conv_depthwise(rng):
    return _graph([helper.make_node("Conv", ["x", "W", "b"], ["y"], name="dwconv", group=8, pads=[1, 1, 1, 1])],
                  (8, 8, 8), {"W": _w(rng, 8, 1, 3, 3), "b": _w(rng, 8, std=0.1)}), (8, 8, 8)


def onnx_conv1d(rng):
    return _graph([helper.make_node("Conv", ["x", "W", "b"], ["y"], name="conv1d", pads=[1, 1])], (8, 20),
                  {"W": _w(rng, 6, 8, 3), "b": _w(rng, 6, std=0.1)}), (8, 20)


def onnx_convtranspose(rng):
    """Weight stored (in, out, kh, kw): onnxruntime's per-channel axis is 1, the engine's output channels."""
    return _graph([helper.make_node("ConvTranspose", ["x", "W", "b"], ["y"], name="convt", strides=[2, 2],
                                    pads=[1, 1, 1, 1], output_padding=[1, 1])], (16, 6, 6),
                  {"W": _w(rng, 16, 8, 3, 3), "b": _w(rng, 8, std=0.1)}), (16, 6, 6)


def onnx_chain_convtranspose(rng):
    """QDQ ConvTranspose -> QOperator Conv: one tensor between them, one quantizer."""
    return _graph([helper.make_node("ConvTranspose", ["x", "W1", "b1"], ["h"], name="convt", strides=[2, 2]),
                   helper.make_node("Conv", ["h", "W2"], ["y"], name="conv", pads=[1, 1, 1, 1])], (16, 5, 5),
                  {"W1": _w(rng, 16, 8, 2, 2), "b1": _w(rng, 8, std=0.1), "W2": _w(rng, 4, 8, 3, 3, std=0.2)}), (16, 5, 5)


def onnx_chain_relu(rng):
    return _graph([helper.make_node("Conv", ["x", "W1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
                   helper.make_node("Relu", ["h"], ["r"], name="relu"),
                   helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2")], (3, 8, 8),
                  {"W1": _w(rng, 8, 3, 3, 3), "b1": _w(rng, 8, std=0.1), "W2": _w(rng, 4, 8, 3, 3, std=0.2)}), (3, 8, 8)


TORCH_CASES = {
    "torch-conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), (3, 8, 8)),
    "torch-linear-2d": (lambda: nn.Sequential(nn.Linear(32, 16)), (32,)),  # exported as Gemm: bias in the kernel
    "torch-linear-3d": (lambda: nn.Sequential(nn.Linear(32, 16)), (6, 32)),  # MatMul + Add: requantized before the bias
    "torch-chain-direct": (lambda: nn.Sequential(nn.Linear(32, 24), nn.Linear(24, 16)), (6, 32)),
    "torch-chain-relu": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                                 nn.Conv2d(8, 4, 3)), (3, 8, 8)),
    "torch-convtranspose2d": (lambda: nn.Sequential(nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1), nn.ReLU(),
                                                      nn.Conv2d(8, 4, 3)), (16, 5, 5)),
}
ONNX_CASES = {"onnx-conv": onnx_conv, "onnx-gemm": onnx_gemm, "onnx-matmul-3d": onnx_matmul_3d,
              "onnx-chain-direct": onnx_chain_direct, "onnx-chain-relu": onnx_chain_relu,
              "onnx-conv-grouped": onnx_conv_grouped, "onnx-conv-depthwise": onnx_conv_depthwise,
              "onnx-conv1d": onnx_conv1d, "onnx-convtranspose": onnx_convtranspose,
              "onnx-chain-convtranspose": onnx_chain_convtranspose}
STATIC_KERNELS = {"QLinearConv (static QOperator)", "QGemm (static QOperator)", "QLinearMatMul (static QOperator)",
                  "ConvTranspose (static QDQ)"}


def _conv_int4(op, x_shape, w_shape, **attrs):
    """One convolution whose K (in/groups * kernel, in the engine's layout) int4's groups of 32 divide."""
    out = w_shape[0] if op == "Conv" else w_shape[1] * attrs.get("group", 1)  # ConvTranspose: (in, out/groups, *k)

    def build(rng):
        return _graph([helper.make_node(op, ["x", "W", "b"], ["y"], name="layer", **attrs)], x_shape,
                      {"W": _w(rng, *w_shape), "b": _w(rng, out, std=0.1)}), x_shape
    return build


INT4_ONNX_CASES = {
    "int4-convtranspose": _conv_int4("ConvTranspose", (16, 5, 5), (16, 8, 2, 2), strides=[2, 2]),  # K = 16 * 4
    "int4-convtranspose-grouped": _conv_int4("ConvTranspose", (16, 5, 5), (16, 4, 2, 2), strides=[2, 2], group=2),
    "int4-conv-grouped": _conv_int4("Conv", (16, 6, 6), (12, 8, 2, 2), group=2),  # K = 8 * 4
    "int4-conv1d": _conv_int4("Conv", (8, 20), (6, 8, 4), pads=[1, 2]),  # K = 8 * 4
}
INT4_TORCH_CASES = {"int4-torch-convtranspose2d": (lambda: nn.Sequential(nn.ConvTranspose2d(16, 8, 2, stride=2)),
                                                   (16, 5, 5))}


def _data(rng, shape):
    """Calibration and evaluation data from one distribution, a few evaluation values beyond the calibrated range."""
    calib = rng.normal(0, 1, (64, *shape)).astype(np.float32)
    x = rng.normal(0, 1, (48, *shape)).astype(np.float32)
    x[0].flat[0] = 6.0
    return calib, x


def _quantizers(model, names: list[str]) -> dict[str, dict[str, tuple[float, int]]]:
    return {n: {t: (float(q[(n, "int8")].scale), int(q[(n, "int8")].zero))
                for t, q in (("input", model.act_quant), ("output", model.out_quant))} for n in names}


def _calibrate(model, calib: np.ndarray) -> None:
    batches = lambda: (torch.from_numpy(calib[s:s + 32]) for s in range(0, len(calib), 32))  # noqa: E731
    calibrate(model, model.activation_stats(batches), [get_format("int8")])


def _session_output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def engine_and_runtime(case: str, fmt: str = "int8") -> tuple[np.ndarray, np.ndarray, float, list[str]]:
    """Engine output and onnxruntime output with every layer at ``fmt``, the last layer's output step (int8),
    and the kernels built."""
    rng = np.random.default_rng(7)
    torch.manual_seed(7)
    onnx_cases, torch_cases = {**ONNX_CASES, **INT4_ONNX_CASES}, {**TORCH_CASES, **INT4_TORCH_CASES}
    if case in onnx_cases:
        model, shape = onnx_cases[case](rng)
        calib, x = _data(rng, shape)
        binding = bind_input(model, shape, case)
        engine = OnnxModel(model, binding, calib[:2], name=case, source=case, sha256="")
        layers = engine._olayers
        to_onnx = {l.name: l.name for l in layers}
    else:
        make, shape = torch_cases[case]
        calib, x = _data(rng, shape)
        module = make().eval()
        engine = TorchModel(module, torch.from_numpy(calib[:2]), name=case, source=case)
        model = export_torch(module, torch.from_numpy(calib[:2]))
        layers = find_layers(model)
        to_onnx = map_to_torch(model, layers, module, [l.name for l in engine.layers()])
        binding = bind_input(model, shape, case)
    names = [l.name for l in engine.layers()]
    static = fmt == "int8"
    if static:
        _calibrate(engine, calib)
    policy = {n: fmt for n in names}
    y_engine = engine.run(torch.from_numpy(x), policy).numpy()
    q = quantize_model(model, layers, {to_onnx[n]: fmt for n in names}, binding, calib,
                       {to_onnx[n]: v for n, v in _quantizers(engine, names).items()} if static else None)
    step = float(engine.out_quant[(names[-1], "int8")].scale) if static else float("nan")
    return y_engine, _session_output(q.model, x), step, sorted(q.kernels.values())


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.mark.parametrize("case", [*ONNX_CASES, *TORCH_CASES])
def test_engine_computes_what_onnxruntime_runs(case):
    y_engine, y_runtime, step, kernels = engine_and_runtime(case)
    assert set(kernels) <= STATIC_KERNELS, kernels
    cos, err = _cosine(y_engine, y_runtime), float(np.abs(y_engine - y_runtime).max())
    print(f"\nparity {case}: cosine {cos:.7f}, max error {err:.4g}, output step {step:.4g} ({err / step:.2f} steps); "
          f"{', '.join(kernels)}")
    assert cos >= COSINE_FLOOR
    assert err <= step * STEP_SLACK


@pytest.mark.parametrize("case", [*INT4_ONNX_CASES, *INT4_TORCH_CASES])
def test_int4_convolutions_compute_what_onnxruntime_runs(case):
    """The blocked uint4 weight, dequantized and regrouped into the kernel's stored layout, is the engine's
    fake-quantized weight: the outputs agree to float rounding (a misplaced channel would not)."""
    y_engine, y_runtime, _, kernels = engine_and_runtime(case, "int4")
    op = "ConvTranspose" if "convtranspose" in case else "Conv"
    assert kernels == [f"DequantizeLinear(uint4, blocked) + {op}"]
    np.testing.assert_allclose(y_runtime, y_engine, rtol=1e-4, atol=1e-5 * float(np.abs(y_engine).max()))


def test_convtranspose_weight_takes_the_engines_per_output_channel_scales():
    """onnxruntime's int8 ConvTranspose weight (int8 codes, per-channel scales along the stored axis 1) dequantizes
    to exactly the engine's fake-quantized weight, fed back in the stored (in, out, kh, kw) layout."""
    rng = np.random.default_rng(7)
    model, shape = onnx_convtranspose(rng)
    calib, _ = _data(rng, shape)
    engine = OnnxModel(model, bind_input(model, shape, "t"), calib[:2], name="t", source="t", sha256="")
    _calibrate(engine, calib)
    built = quantize_model(model, engine._olayers, {"convt": "int8"}, engine.binding, calib,
                           _quantizers(engine, ["convt"])).model
    dq = next(n for n in built.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "W_quantized")
    codes, scale = _initializer(built, dq.input[0]), _initializer(built, dq.input[1])
    axis = next(a.i for a in dq.attribute if a.name == "axis")
    assert (axis, scale.shape, codes.shape) == (1, (8,), (16, 8, 3, 3))
    runtime_w = codes.astype(np.float32) * scale.reshape(1, -1, 1, 1)
    assert np.array_equal(runtime_w, engine._fake_stored("convt", get_format("int8")))


def test_without_the_output_requantization_the_engine_would_miss_it():
    """The check above can fail: the engine's input+weight-only fake-quant is further from onnxruntime."""
    rng = np.random.default_rng(7)
    model, shape = onnx_chain_relu(rng)
    calib, x = _data(rng, shape)
    engine = OnnxModel(model, bind_input(model, shape, "t"), calib[:2], name="t", source="t", sha256="")
    _calibrate(engine, calib)
    names = [l.name for l in engine.layers()]
    policy = {n: "int8" for n in names}
    q = quantize_model(model, engine._olayers, policy, engine.binding, calib, _quantizers(engine, names))
    y_runtime = _session_output(q.model, x)
    with_output = np.abs(engine.run(torch.from_numpy(x), policy).numpy() - y_runtime).max()
    engine.out_quant.clear()
    without = np.abs(engine.run(torch.from_numpy(x), policy).numpy() - y_runtime).max()
    assert without > 2 * with_output


def test_one_tensor_takes_one_quantizer():
    """A layer's output that is the next layer's input is one tensor in onnxruntime: the engine's two
    quantizers for it must be the same, and a disagreement is refused rather than settled silently."""
    layers = find_layers(onnx_chain_direct(np.random.default_rng(0))[0])
    same = {"mm1": {"input": (0.05, 128), "output": (0.1, 3)}, "gemm2": {"input": (0.1, 3), "output": (0.2, 7)}}
    assert static_quantizers(layers, ["mm1", "gemm2"], same) == {"x": (0.05, 128), "h": (0.1, 3), "y": (0.2, 7)}
    with pytest.raises(RuntimeError, match="tensor 'h' gets two quantizers"):
        static_quantizers(layers, ["mm1", "gemm2"], {**same, "gemm2": {"input": (0.11, 3)}})


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_percentile_ranges_reach_onnxruntime(tmp_path):
    """``--observer percentile`` clips an outlier min-max would keep; the model apply builds uses the Run's
    scales and zero points for every int8 layer's input and output, not a recalibration of its own."""
    rng = np.random.default_rng(3)
    model, shape = onnx_chain_relu(rng)
    onnx.save(model, tmp_path / "m.onnx")
    x = rng.normal(0, 1, (400, *shape)).astype(np.float32)
    x[5, 0, 3, 3] = 40.0  # one outlier in 76,800 values: min-max would spend the input range on it
    np.savez(tmp_path / "d.npz", inputs=x, calib_inputs=x)
    run = sweep_to_run(str(tmp_path / "m.onnx"), str(tmp_path / "d.npz"), tmp_path / "run", formats="int8",
                       observer="percentile", random_policies=0, progress=False)
    clip = run.clipping[run.clipping["tensor"].isin(["input", "output"])].set_index(["layer", "tensor"])
    assert clip.loc[("conv1", "input"), "clip_hi"] < 20  # the outlier is clipped
    layers = {l.name: l for l in find_layers(model)}
    built = apply_policy(run, {"schema": "quantlens.policy/1", "model": {"sha256": run.model_sha256},
                               "default": "int8", "layers": {}}).model
    for (layer, tensor), r in clip.iterrows():
        t = getattr(layers[layer], tensor)
        assert _initializer(built, f"{t}_scale") == np.float32(r["scale"]), (layer, tensor)
        assert _initializer(built, f"{t}_zero_point") == r["zero_point"], (layer, tensor)
    ops = [n.op_type for n in built.graph.node]
    assert ops.count("QLinearConv") == 2
    q_scales = [n.input[1] for n in built.graph.node if n.op_type == "QuantizeLinear"]
    assert _initializer(built, q_scales[0]) == np.float32(clip.loc[("conv1", "input"), "scale"])


def test_a_run_without_stored_quantizers_still_builds(tmp_path):
    """Runs from before the scales were stored: onnxruntime calibrates those tensors itself."""
    rng = np.random.default_rng(3)
    model, shape = onnx_gemm(rng)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", inputs=rng.normal(0, 1, (64, *shape)).astype(np.float32))
    run = sweep_to_run(str(tmp_path / "m.onnx"), str(tmp_path / "d.npz"), tmp_path / "run", formats="int8",
                       random_policies=0, progress=False)
    old = shutil.copytree(run.path, tmp_path / "old")
    pd.read_parquet(old / "clipping.parquet").drop(columns=["scale", "zero_point"]).to_parquet(old / "clipping.parquet")
    policy = {"schema": "quantlens.policy/1", "model": {"sha256": run.model_sha256}, "default": "int8", "layers": {}}
    assert "QGemm" in [n.op_type for n in apply_policy(old, policy).model.graph.node]
