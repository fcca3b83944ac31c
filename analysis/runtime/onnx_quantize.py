"""A real quantized ONNX model for a policy, built for onnxruntime's integer kernels.

Which kernel each format gets (recorded per layer in ``QuantizedModel.kernels``):

* ``int8`` (W8A8, calibrated activations): ``quantize_static`` in QOperator format, per
  channel, symmetric int8 weights, asymmetric uint8 activations -> ``QLinearConv`` /
  ``QGemm`` / ``QLinearMatMul``, which also requantize their output to uint8. Input and
  output take the engine's quantizers (scale and zero point, ``TensorQuantOverrides``);
  only a tensor without one (a Run from before they were stored) gets onnxruntime's
  min-max calibration on the task's calibration data.
* ``int8`` on ``ConvTranspose``: onnxruntime has no QOperator form, so ``quantize_static`` in
  QDQ format, the same quantizers, weight scales per stored axis 1 (the output channels;
  a grouped one would share them across groups and is refused) -> ``QuantizeLinear`` /
  ``DequantizeLinear`` around a float ``ConvTranspose`` (onnxruntime's CPU runs no integer
  kernel for it: no speed-up to expect).
* ``int4`` on ``MatMul`` (and on plain ``Gemm``, rewritten to ``MatMul`` + ``Add`` first):
  ``MatMulNBitsQuantizer``, blocks of 32 along K, asymmetric -> ``MatMulNBits``.
* ``int4`` on ``Conv`` / ``ConvTranspose`` (and on a ``Gemm`` that cannot be rewritten): onnxruntime's
  tools have no group-wise 4-bit path for these, so the weight is stored as uint4 codes with
  a blocked ``DequantizeLinear`` (opset 21, ``block_size`` 32 along the flattened K) in
  front of the float kernel, then put back in the kernel's stored layout (a ConvTranspose's
  (in, out/groups, *k)); codes, scales and zero points are the engine's own.
* ``int8-dyn`` on ``MatMul`` (and plain ``Gemm``, rewritten as for int4): ``quantize_dynamic``,
  per channel, symmetric int8 weights -> ``DynamicQuantizeLinear`` + ``MatMulInteger``. Each
  layer reads its input through its own ``Identity``, so the quantizer cannot reuse a static
  layer's ``QuantizeLinear`` of the same tensor (it does, silently, by tensor name).

Order matters (see ``quantize_model``): opset conversion, then the blocked DQ weights,
then ``MatMulNBits``, then ``quantize_static``, which calibrates the graph as it then is
(dynamic layers still in float, as the engine calibrates), then ``quantize_dynamic``.

Layers inside ``If`` / ``Loop`` / ``Scan`` subgraphs are not analysed and stay float: the 4-bit
quantizer, which walks subgraphs, is kept out of them by node name, and a QOperator kernel's output
that a subgraph reads from the outer scope is dequantized back under its name before that node.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from analysis.quant.formats import QuantFormat, get_format
from analysis.models.onnx_io import InputBinding
from analysis.models.onnx_graph import (OnnxLayer, all_reads, default_opset, dynamic_skip_reason, has_subgraphs,
                                        initializer_array, name_nodes, outer_reads, subgraphs, to_oik)
from analysis.quant.primitives import group_size_error, quantize_weight, transposed_conv_error
from analysis.errors import InputError

BLOCKED_DQ_OPSET = 21
BUILDABLE = ("fp32", "int8", "int4", "int8-dyn")  # registered formats this module can build
KERNEL_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulNBits",
              "Conv", "ConvTranspose", "Gemm", "MatMul")


class QuantizeError(InputError):
    """A policy that cannot be built into a quantized ONNX model; the message names the layer."""


@dataclass
class QuantizedModel:
    model: onnx.ModelProto
    formats: dict[str, str]  # onnx layer -> format actually applied
    kernels: dict[str, str] = field(default_factory=dict)  # onnx layer -> e.g. "QLinearConv (static QOperator)"
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizers log advice through the root logger; keep stderr for our errors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _replace_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(array, name))
            return
    model.graph.initializer.append(numpy_helper.from_array(array, name))


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = all_reads(model) | {i.name for i in model.graph.input}  # subgraphs may read outer initializers
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _weight_oik(model: onnx.ModelProto, layer: OnnxLayer) -> np.ndarray:
    return np.ascontiguousarray(to_oik(layer, initializer_array(model, layer.weight).astype(np.float32)))


def _uint4(name: str, dims: list[int], values: torch.Tensor) -> onnx.TensorProto:
    """A UINT4 initializer stored packed, two codes a byte, the first in the low nibble (as ONNX lays them out;
    a list of ints would be stored one code per element, about three times larger on disk)."""
    v = values.reshape(-1).numpy().astype(np.uint8)
    if v.size % 2:
        v = np.append(v, np.uint8(0))
    return helper.make_tensor(name, TensorProto.UINT4, dims, (v[0::2] | (v[1::2] << 4)).tobytes(), raw=True)


def _blocked_dq_weight(model: onnx.ModelProto, layer: OnnxLayer, fmt: QuantFormat) -> None:
    """Feed ``layer`` from uint4 codes through a blocked DequantizeLinear (see module docstring)."""
    W = torch.from_numpy(_weight_oik(model, layer))
    codes, scale, zero = quantize_weight(W, fmt.weight)  # (out, K/g, g), (out, K/g, 1), (out, K/g, 1)
    out, n_groups, g = codes.shape
    p = f"{layer.name}/int4"
    groups = layer.groups if layer.op == "ConvTranspose" else 1
    # a grouped ConvTranspose goes (out, in/g, *k) -> (g, out/g, in/g, *k) -> its stored (in, out/g, *k)
    shape = list(W.shape) if groups == 1 else [groups, out // groups, *W.shape[1:]]
    model.graph.initializer.extend([
        _uint4(f"{p}/codes", [out, n_groups * g], codes),
        numpy_helper.from_array(scale.reshape(out, n_groups).numpy().astype(np.float32), f"{p}/scale"),
        _uint4(f"{p}/zero", [out, n_groups], zero),
        numpy_helper.from_array(np.array(shape, dtype=np.int64), f"{p}/shape"),
    ])
    new = [helper.make_node("DequantizeLinear", [f"{p}/codes", f"{p}/scale", f"{p}/zero"], [f"{p}/dq"],
                            name=f"{p}/DequantizeLinear", axis=1, block_size=g),
           helper.make_node("Reshape", [f"{p}/dq", f"{p}/shape"], [f"{p}/w"], name=f"{p}/Reshape")]
    w_in = f"{p}/w"
    if layer.transposed:
        new.append(helper.make_node("Transpose", [w_in], [f"{p}/wT"], name=f"{p}/Transpose", perm=[1, 0]))
        w_in = f"{p}/wT"
    elif layer.op == "ConvTranspose":
        swap = [1, 0] if groups == 1 else [0, 2, 1]
        new.append(helper.make_node("Transpose", [w_in], [f"{p}/wT"], name=f"{p}/Transpose",
                                    perm=[*swap, *range(len(swap), len(shape))]))
        w_in = f"{p}/wT"
        if groups > 1:
            stored = initializer_array(model, layer.weight).shape
            model.graph.initializer.append(numpy_helper.from_array(np.array(stored, dtype=np.int64), f"{p}/stored_shape"))
            new.append(helper.make_node("Reshape", [w_in, f"{p}/stored_shape"], [f"{p}/ws"], name=f"{p}/ReshapeStored"))
            w_in = f"{p}/ws"
    _insert_before(model, layer.name, new)
    _node(model, layer.name).input[1] = w_in


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in model.graph.node:
        if n.name == name:
            return n
    raise KeyError(f"no node '{name}'")


def _insert_before(model: onnx.ModelProto, name: str, new: list[onnx.NodeProto], offset: int = 0) -> None:
    nodes = list(model.graph.node)
    i = next(k for k, n in enumerate(nodes) if n.name == name) + offset
    del model.graph.node[:]
    model.graph.node.extend(nodes[:i] + new + nodes[i:])


def _insert_after(model: onnx.ModelProto, name: str, new: list[onnx.NodeProto]) -> None:
    _insert_before(model, name, new, offset=1)


def _gemm_as_matmul(model: onnx.ModelProto, layer: OnnxLayer) -> bool:
    """Rewrite a plain Gemm (alpha=1, no transA) as MatMul [+ Add], keeping the node's name."""
    node = _node(model, layer.name)
    if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0:
        return False
    w_kn = _weight_oik(model, layer).T  # MatMul wants (K, N)
    w_name = f"{layer.name}/weight_KxN"
    _replace_initializer(model, w_name, np.ascontiguousarray(w_kn))
    out = node.output[0]
    has_bias = len(node.input) > 2 and node.input[2]
    mm = helper.make_node("MatMul", [node.input[0], w_name], [f"{out}/matmul" if has_bias else out], name=layer.name)
    new = [mm]
    if has_bias:
        bias = node.input[2]
        beta = _attr(node, "beta", 1.0)
        if beta != 1.0:
            b = initializer_array(model, bias) * np.float32(beta)
            bias = f"{layer.name}/bias_scaled"
            _replace_initializer(model, bias, b.astype(np.float32))
        new.append(helper.make_node("Add", [mm.output[0], bias], [out], name=f"{layer.name}/bias"))
    nodes = list(model.graph.node)
    i = nodes.index(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes[:i] + new + nodes[i + 1:])
    return True


def _matmul_nbits(model: onnx.ModelProto, names: list[str], group_size: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # nodes_to_include does not restrict, and the quantizer walks subgraphs too: exclude every other node
    others = [n for n in _node_names(model.graph) if n not in set(names)]
    with _quiet():
        q = MatMulNBitsQuantizer(model, block_size=group_size, is_symmetric=False, nodes_to_exclude=others)
        q.process()
    return q.model.model


def _node_names(graph: onnx.GraphProto) -> list[str]:
    """Names of a graph's nodes and of its subgraphs' nodes."""
    return [n for node in graph.node for n in [node.name, *(m for _, g in subgraphs(node) for m in _node_names(g))]]


class _Reader:
    """Calibration batches for ``quantize_static``, cut to what the model's input accepts."""

    def __init__(self, binding: InputBinding, calib: np.ndarray, batch: int = 64) -> None:
        self.items = [feed for s in range(0, len(calib), batch) for feed, _ in binding.feeds(calib[s:s + batch])]
        self.i = 0

    def get_next(self):
        if self.i >= len(self.items):
            return None
        self.i += 1
        return self.items[self.i - 1]

    def rewind(self):
        self.i = 0


Quantizers = dict[str, dict[str, tuple[float, int]]]  # layer -> {"input" | "output": (scale, zero point)}


def static_quantizers(layers: list[OnnxLayer], names: list[str],
                      quantizers: Quantizers) -> dict[str, tuple[float, int]]:
    """``(scale, zero point)`` by tensor name for the inputs and outputs of the ``names`` layers.

    onnxruntime has one quantizer per tensor: layers reading one tensor (Q, K, V) share it, and so do a
    layer's output and the next layer's input when nothing lies between them. The engine derives each
    quantizer from the tensor's own statistics with one observer, so both sides agree; a disagreement
    is a bug in the engine, not a choice to make here.
    """
    by_name = {l.name: l for l in layers}
    out: dict[str, tuple[float, int]] = {}
    owner: dict[str, str] = {}
    for name in names:
        for tensor, (scale, zero) in quantizers.get(name, {}).items():
            t = by_name[name].input if tensor == "input" else by_name[name].output
            if t in out and (not np.isclose(out[t][0], scale, rtol=1e-6, atol=0) or out[t][1] != zero):
                raise RuntimeError(f"tensor '{t}' gets two quantizers: {out[t]} as a tensor of layer '{owner[t]}', "
                                   f"{(scale, zero)} as the {tensor} of layer '{name}'")
            out.setdefault(t, (scale, zero))
            owner.setdefault(t, name)
    return out


def _quantize_static(model: onnx.ModelProto, names: list[str], binding: InputBinding, calib: np.ndarray,
                     given: dict[str, tuple[float, int]], *, qdq: bool = False) -> onnx.ModelProto:
    """``quantize_static`` of the ``names`` layers (QOperator, or QDQ for ConvTranspose); the tensors in ``given``
    take those (scale, zero point) instead of onnxruntime's min-max calibration, which covers only the tensors
    around top-level nodes of the quantized op types.

    Raises:
        QuantizeError: onnxruntime fails on a model with subgraphs (the message names the node holding one).
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat as OrtFormat,
                                          QuantType, quantize_static)

    # 0-d arrays: onnxruntime's QuantizationParams refuses numpy scalars
    overrides = {t: [{"scale": np.array(scale, np.float32), "zero_point": np.array(zero, np.uint8)}]
                 for t, (scale, zero) in given.items()}
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(binding, calib)
    with tempfile.TemporaryDirectory(prefix="quantlens-q8-") as tmp, _quiet():
        out = Path(tmp) / "q8.onnx"
        try:
            quantize_static(model, str(out), reader, quant_format=OrtFormat.QDQ if qdq else OrtFormat.QOperator,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=list(names),
                            op_types_to_quantize=["ConvTranspose"] if qdq else ["Conv", "Gemm", "MatMul"],
                            calibrate_method=CalibrationMethod.MinMax,
                            # the bias adjustment would move the weight scales off the engine's
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                           "TensorQuantOverrides": overrides,
                                           "QDQDisableWeightAdjustForInt32Bias": True})
        except Exception as e:
            holder = next((n.name for n in model.graph.node for _ in subgraphs(n)), None)
            if holder is None:
                raise
            raise QuantizeError(f"onnxruntime's static int8 quantizer fails on this model, which holds subgraphs "
                                f"(node '{holder}'): {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        return onnx.load(str(out))


def _static_qoperator(model: onnx.ModelProto, layers: list[OnnxLayer], binding: InputBinding, calib: np.ndarray,
                      given: dict[str, tuple[float, int]]) -> onnx.ModelProto:
    """QOperator kernels for Conv / Gemm / MatMul ``layers``.

    A QOperator kernel writes its output under a new name and dequantizes it back to the old one only where a
    top-level node reads it; a subgraph that reads it from the outer scope would find nothing. So such a tensor
    gets a top-level reader (an ``Identity``) just before the node that holds the subgraph, removed again after.
    """
    outputs = {l.output for l in layers}
    anchors = []
    for node in list(model.graph.node):
        for t in sorted(outputs & set().union(*(outer_reads(g) for _, g in subgraphs(node)))):
            anchors.append(helper.make_node("Identity", [t], [f"quantlens/outer/{t}"], name=f"quantlens/outer/{t}"))
            _insert_before(model, node.name, [anchors[-1]])
            outputs.discard(t)
    q = _quantize_static(model, [l.name for l in layers], binding, calib, given)
    if anchors:
        gone = {a.name for a in anchors}
        keep = [n for n in q.graph.node if n.name not in gone]
        del q.graph.node[:]
        q.graph.node.extend(keep)
    return q


def _static_transposed(model: onnx.ModelProto, layers: list[OnnxLayer], binding: InputBinding, calib: np.ndarray,
                       given: dict[str, tuple[float, int]]) -> onnx.ModelProto:
    """QDQ around ConvTranspose ``layers`` (onnxruntime has no QOperator form for it): input, weight (per channel
    along the stored axis 1, the output channels) and output.

    QDQ rewires every reader of a quantized tensor to its dequantized copy; each layer reads its input and writes
    its output through a private ``Identity``, so other readers of its input keep the float tensor (as in the
    engine) and every reader of its output, subgraphs included, sees it requantized (as a QOperator kernel's).
    """
    private: dict[str, tuple[float, int]] = {}
    for l in layers:
        x, y = f"{l.name}/input", f"{l.name}/output"
        _insert_before(model, l.name, [helper.make_node("Identity", [l.input], [x], name=x)])
        node = _node(model, l.name)
        node.input[0], node.output[0] = x, y
        _insert_after(model, l.name, [helper.make_node("Identity", [y], [l.output], name=y)])
        private.update({t: given[g] for t, g in ((x, l.input), (y, l.output)) if g in given})
    return _quantize_static(model, [l.name for l in layers], binding, calib, private, qdq=True)


def _quantize_dynamic(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in names:  # a private input per layer (see the module docstring)
        x = _node(model, name).input[0]
        _insert_before(model, name, [helper.make_node("Identity", [x], [f"{name}/input"], name=f"{name}/input")])
        _node(model, name).input[0] = f"{name}/input"  # after the insertion: it rebuilds the node list
    with tempfile.TemporaryDirectory(prefix="quantlens-dyn-") as tmp, _quiet():
        out = Path(tmp) / "dyn.onnx"
        quantize_dynamic(model, str(out), per_channel=True, weight_type=QuantType.QInt8, nodes_to_quantize=list(names),
                         op_types_to_quantize=["MatMul"])
        return onnx.load(str(out))


def layer_nodes(model: onnx.ModelProto, layer: OnnxLayer) -> list[onnx.NodeProto]:
    """The nodes that carry out ``layer`` in a model built here (named after it or its tensors)."""
    own = (f"{layer.name}_", f"{layer.name}/")
    qdq = {f"{layer.input}_QuantizeLinear", f"{layer.output}_DequantizeLinear"}
    return [n for n in model.graph.node if n.name == layer.name or n.name.startswith(own) or n.name in qdq]


def _kernel_label(nodes: list[onnx.NodeProto]) -> str:
    ops = [n.op_type for n in nodes]
    main = next((op for op in KERNEL_OPS if op in ops), ops[0] if ops else "?")
    if main in ("QLinearConv", "QGemm", "QLinearMatMul"):
        return f"{main} (static QOperator)"
    if main in ("MatMulInteger", "ConvInteger"):
        return f"{main} (dynamic)"
    if main == "ConvTranspose" and "QuantizeLinear" in ops:
        return f"{main} (static QDQ)"
    if main == "MatMulNBits":
        return "MatMulNBits"
    if "DequantizeLinear" in ops:
        return f"DequantizeLinear(uint4, blocked) + {main}"
    return main


def quantize_model(model: onnx.ModelProto, layers: list[OnnxLayer], policy: dict[str, str], binding: InputBinding,
                   calib: np.ndarray, quantizers: Quantizers | None = None,
                   specs: dict[str, QuantFormat] | None = None) -> QuantizedModel:
    """The quantized model for ``policy`` (ONNX layer name -> format); see the module docstring.

    Layers that share one weight take one format: the least aggressive one the policy gives
    any of them (fp32 before int8-dyn before int8 before int4), so the stored weight stays consistent.
    ``quantizers`` are the engine's for the int8 layers' inputs and outputs (the Run stores them); a
    tensor without one is calibrated min-max on ``calib`` by onnxruntime. ``specs`` are the formats as
    the Run measured them (e.g. another int4 group size, ``--group-size``); the registry's otherwise.

    Raises:
        QuantizeError: a layer the model lacks, an unknown format, or a format the layer cannot take.
    """
    by_name = {l.name: l for l in layers}
    fmts: dict[str, str] = {}
    for name, f in policy.items():
        if name not in by_name:
            raise QuantizeError(f"policy names layer '{name}', which the model does not have as a quantizable node")
        fmt = ((specs or {}).get(f) or get_format(f)) if f in BUILDABLE else None
        if fmt is None:
            raise QuantizeError(f"policy gives layer '{name}' format {f!r}; known: {', '.join(BUILDABLE)}")
        if fmt.is_dynamic and (why := dynamic_skip_reason(_node(model, name))):
            raise QuantizeError(f"layer '{name}' cannot take {f}: {why}")
        if fmt.weight is not None and (why := group_size_error(_weight_oik(model, by_name[name]).shape, fmt.weight)):
            raise QuantizeError(f"layer '{name}' cannot take {f}: {why}")
        if (fmt.weight is not None and by_name[name].op == "ConvTranspose"
                and (why := transposed_conv_error(by_name[name].groups, fmt.weight))):
            raise QuantizeError(f"layer '{name}' cannot take {f}: {why}")
        fmts[name] = f
    notes: list[str] = []
    rank = {"fp32": 0, "int8-dyn": 1, "int8": 2, "int4": 3}
    groups: dict[str, list[str]] = {}
    for l in layers:
        groups.setdefault(l.weight, []).append(l.name)
    for members in groups.values():
        chosen = [fmts.get(n, "fp32") for n in members]
        if len(members) > 1 and len(set(chosen)) > 1:
            keep = min(chosen, key=rank.__getitem__)
            notes.append(f"layers {', '.join(members)} share one weight: all kept at {keep}")
            for n in members:
                fmts[n] = keep

    m = onnx.ModelProto()
    m.CopyFrom(model)
    if has_subgraphs(m):
        name_nodes(m)  # the 4-bit quantizer walks subgraphs; it is kept out of them by node name
    int4 = [l for l in layers if fmts.get(l.name) == "int4"]
    int8 = [l.name for l in layers if fmts.get(l.name) == "int8"]
    dyn = [l for l in layers if fmts.get(l.name) == "int8-dyn"]
    fmt4 = (specs or {}).get("int4") or get_format("int4")
    g = fmt4.weight.granularity.group_size
    matmul4, blocked4 = [], []
    for l in int4:
        if l.op == "MatMul" or (l.op == "Gemm" and not _attr(_node(m, l.name), "transA", 0)
                                and _attr(_node(m, l.name), "alpha", 1.0) == 1.0):
            matmul4.append(l)
        else:
            blocked4.append(l)
    if blocked4 and default_opset(m) < BLOCKED_DQ_OPSET:
        from onnx import version_converter

        try:
            m = version_converter.convert_version(m, BLOCKED_DQ_OPSET)
        except Exception as e:
            raise QuantizeError(f"int4 on {blocked4[0].op} layers needs opset {BLOCKED_DQ_OPSET}; converting the model "
                                f"failed ({str(e).splitlines()[0][:160]})") from None
        notes.append(f"converted to opset {BLOCKED_DQ_OPSET} for blocked int4 DequantizeLinear")
    for l in blocked4:
        _blocked_dq_weight(m, l, fmt4)
    for l in matmul4 + dyn:
        if l.op == "Gemm":
            _gemm_as_matmul(m, l)
    _drop_unused_initializers(m)
    if matmul4:
        m = _matmul_nbits(m, [l.name for l in matmul4], g)
    if int8:
        given = static_quantizers(layers, int8, quantizers or {})
        needed = {t for l in layers if l.name in int8 for t in (l.input, l.output)}
        # onnxruntime calibrates every tensor it quantizes; where all are given, one sample is enough
        sample = calib if needed - set(given) else calib[:1]
        if transposed := [by_name[n] for n in int8 if by_name[n].op == "ConvTranspose"]:
            m = _static_transposed(m, transposed, binding, sample, given)
        if qoperator := [by_name[n] for n in int8 if by_name[n].op != "ConvTranspose"]:
            m = _static_qoperator(m, qoperator, binding, sample, given)
    if dyn:
        m = _quantize_dynamic(m, [l.name for l in dyn])
    _drop_unused_initializers(m)
    kernels = {}
    for l in layers:
        if fmts.get(l.name, "fp32") != "fp32":
            kernels[l.name] = _kernel_label(layer_nodes(m, l))
    return QuantizedModel(m, {l.name: fmts.get(l.name, "fp32") for l in layers}, kernels, notes)
