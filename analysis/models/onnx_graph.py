"""Reading ONNX files and finding their quantizable layers.

What a user's ``.onnx`` file may hold and how it is brought to one shape here:

* external-data files (checked to exist before loading, so a missing one is named);
* opsets from 11 up (converted to ``MIN_OPSET`` with ``onnx.version_converter``: the
  per-channel and QDQ operators need it);
* weights in ``Constant`` nodes (turned into initializers, as the quantizers expect);
* nodes without names or with duplicate names (named ``<op>_<index>``: layer names
  must be unique, and they are what a policy file refers to);
* weights shared between nodes (reported in ``shared_weights``).

A layer is a ``Conv``, ``Gemm`` or ``MatMul`` node whose weight is an initializer; its
weight is described in the (out, in, *kernel) layout the engine uses (MatMul and
``transB=0`` Gemm weights are stored (in, out) and transposed on read).
"""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from analysis.models.base import ModelError
from analysis.quant.formats import DYNAMIC_CONV_REASON

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (axis) arrived in opset 13
OLDEST_OPSET = 11
LAYER_OPS = ("Conv", "Gemm", "MatMul")


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return 0


def _external_files(model: onnx.ModelProto) -> dict[str, str]:
    """External-data location -> first tensor stored there."""
    out = {}
    for t in _all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            out.setdefault(loc, t.name)
    return out


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def file_sha256(path: str | Path, model: onnx.ModelProto | None = None) -> str:
    """Hash of the ONNX file and of every external-data file it names (sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] + [path.parent / loc for loc in sorted(_external_files(model))] if model is not None else [path]
    for f in files:
        h.update(f.name.encode() + b"|")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_onnx(path: str | Path) -> tuple[onnx.ModelProto, str, list[str]]:
    """``(model, sha256, notes)`` for an ONNX file, normalised as the module docstring says.

    Raises:
        ModelError: unreadable or truncated file, a missing external-data file, an opset
            older than 11, or a model the ONNX checker rejects. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: empty file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:160]})") from None
    if not model.graph.node:
        raise ModelError(f"{path}: not a readable ONNX model (no graph nodes; truncated or not ONNX?)")
    for loc, tensor in _external_files(model).items():
        if not loc or not (path.parent / loc).is_file():
            raise ModelError(f"{path}: external-data file '{loc}' (tensor '{tensor}') is missing next to the model")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise ModelError(f"{path}: cannot read its external data ({type(e).__name__}: {str(e)[:160]})") from None
    sha = file_sha256(path, model)
    notes: list[str] = []
    opset = default_opset(model)
    if opset < OLDEST_OPSET:
        raise ModelError(f"{path}: opset {opset} is older than {OLDEST_OPSET}; re-export with a newer opset")
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:
            raise ModelError(f"{path}: cannot convert opset {opset} to {MIN_OPSET} ({str(e).splitlines()[0][:160]})") from None
        notes.append(f"converted from opset {opset} to {MIN_OPSET}")
    n_const = constants_to_initializers(model)
    if n_const:
        notes.append(f"{n_const} Constant node(s) turned into initializers")
    n_named = name_nodes(model)
    if n_named:
        notes.append(f"{n_named} node(s) without a unique name were named <op>_<index>")
    try:
        onnx.checker.check_model(model) if model.ByteSize() < 2**31 - 1 else None
    except Exception as e:
        raise ModelError(f"{path}: the ONNX checker rejects the model ({str(e).splitlines()[0][:200]})") from None
    return model, sha, notes


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Replace top-level ``Constant`` nodes holding a tensor by initializers; returns how many."""
    keep, n = [], 0
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            model.graph.initializer.append(t)
            n += 1
        else:
            keep.append(node)
    if n:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return n


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every node a unique, non-empty name (quantizers and policies address nodes by name)."""
    counts = Counter(n.name for n in model.graph.node)
    taken, renamed = set(counts), 0
    for i, node in enumerate(model.graph.node):
        if node.name and counts[node.name] == 1:
            continue
        base = f"{node.op_type}_{i}" if not node.name else f"{node.name}_{i}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        node.name = name
        renamed += 1
    return renamed


@dataclass(frozen=True)
class OnnxLayer:
    """A quantizable node: its weight initializer and how to read it as (out, in, *kernel)."""

    name: str
    op: str
    index: int  # position of the node in the graph (ONNX nodes are topologically sorted)
    weight: str
    transposed: bool  # stored (in, out): MatMul, or Gemm with transB=0
    bias: str | None
    input: str
    output: str


def dynamic_skip_reason(node: onnx.NodeProto) -> str | None:
    """Why onnxruntime's dynamic int8 (``MatMulInteger``, which ``quantize_dynamic`` builds for MatMul only)
    cannot run a layer node, or None: a Gemm must be plain enough to be rewritten as MatMul [+ Add]."""
    if node.op_type == "Conv":
        return DYNAMIC_CONV_REASON
    if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0):
        return "dynamic int8 runs a Gemm as MatMul + Add, which needs alpha=1 and no transA"
    return None


def find_layers(model: onnx.ModelProto) -> list[OnnxLayer]:
    """Conv / Gemm / MatMul nodes with a constant weight, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    layers = []
    for i, node in enumerate(model.graph.node):
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            continue
        w = inits.get(node.input[1])
        if w is None or node.input[0] in inits or w.data_type not in (onnx.TensorProto.FLOAT,):
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        if node.op_type == "MatMul":
            if len(w.dims) != 2:
                continue
            transposed = True
        elif node.op_type == "Gemm":
            transposed = not _attr(node, "transB", 0)
        else:
            if len(w.dims) < 3:
                continue
            transposed = False
        layers.append(OnnxLayer(node.name, node.op_type, i, w.name, transposed, bias, node.input[0], node.output[0]))
    return layers


def shared_weights(layers: list[OnnxLayer]) -> dict[str, list[str]]:
    """Initializer -> the layers that share it (only weights used by two or more layers)."""
    users = defaultdict(list)
    for l in layers:
        users[l.weight].append(l.name)
    return {w: names for w, names in users.items() if len(names) > 1}


def initializer_array(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(f"no initializer '{name}'")


def downstream_tensors(model: onnx.ModelProto, start: str) -> set[str]:
    """Every tensor computed from ``start`` (top-level graph)."""
    reached = {start}
    for node in model.graph.node:  # topological order: one pass suffices
        if any(i in reached for i in node.input):
            reached.update(o for o in node.output if o)
    return reached
