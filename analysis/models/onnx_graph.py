"""Reading ONNX files and finding their quantizable layers.

What a user's ``.onnx`` file may hold and how it is brought to one shape here:

* external-data files (checked to exist before loading, so a missing one is named);
* opsets from 11 up (converted to ``MIN_OPSET`` with ``onnx.version_converter``: the
  per-channel and QDQ operators need it);
* weights in ``Constant`` nodes (turned into initializers, as the quantizers expect);
* nodes without names or with duplicate names (named ``<op>_<index>``: layer names
  must be unique, and they are what a policy file refers to);
* weights shared between nodes (reported in ``shared_weights``);
* ``If`` / ``Loop`` / ``Scan`` subgraphs: their nodes are named too, and the layers inside them
  are listed as not analysed (``subgraph_layers``); a subgraph may read any outer tensor by name,
  which ``node_reads`` counts as an input of the node that holds it.

A layer is a top-level ``Conv``, ``ConvTranspose``, ``Gemm`` or ``MatMul`` node whose weight is an
initializer; its weight is described in the (out, in, *kernel) layout the engine uses (``to_oik``:
MatMul and ``transB=0`` Gemm weights are stored (in, out) and transposed on read, ConvTranspose
weights are stored (in, out/groups, *kernel) and regrouped on read).
"""
from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from analysis.models.base import ModelError
from analysis.quant.formats import DYNAMIC_CONV_REASON
from analysis.quant.primitives import swap_transposed_conv_layout

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (axis) arrived in opset 13
OLDEST_OPSET = 11
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
CONV_OPS = ("Conv", "ConvTranspose")
NOT_ANALYSED = "layers in subgraphs are not analysed"


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
    """Initializers and tensor attributes, subgraphs' too (their weights may live in external files)."""
    def walk(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
            for _, sub in subgraphs(node):
                yield from walk(sub)

    yield from walk(model.graph)


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
    """Give every node a unique, non-empty name (quantizers and policies address nodes by name).

    Top-level nodes first, as ``<op>_<index>``; then the nodes of subgraphs, unique across the whole
    model (onnxruntime's 4-bit quantizer walks subgraphs and is kept out of them by node name), as
    ``<holder>/<attribute>/<op>_<index>``. Names that are already unique are kept."""
    counts = Counter(n.name for n in model.graph.node)
    taken, renamed = set(counts), 0

    def unique(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    for i, node in enumerate(model.graph.node):
        if node.name and counts[node.name] == 1:
            continue
        node.name = unique(f"{node.op_type}_{i}" if not node.name else f"{node.name}_{i}")
        renamed += 1

    def inside(graph: onnx.GraphProto) -> None:
        nonlocal renamed
        for node in graph.node:
            for attr, sub in subgraphs(node):
                for i, n in enumerate(sub.node):
                    if not n.name or n.name in taken:
                        n.name = unique(f"{node.name}/{attr}/{n.op_type}_{i}" if not n.name else f"{n.name}_{i}")
                        renamed += 1
                    else:
                        taken.add(n.name)
                inside(sub)

    inside(model.graph)
    return renamed


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """``(attribute, graph)`` for each subgraph a node holds (``If`` branches, ``Loop`` / ``Scan`` bodies)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            for k, g in enumerate(a.graphs):
                yield f"{a.name}[{k}]", g


def has_subgraphs(model: onnx.ModelProto) -> bool:
    return any(True for node in model.graph.node for _ in subgraphs(node))


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Tensors a subgraph's nodes (at any depth) read from the scopes around it, by name."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    read: set[str] = set()
    for node in graph.node:
        read |= node_reads(node)
        defined.update(node.output)
    return read - defined


def node_reads(node: onnx.NodeProto) -> set[str]:
    """The tensors a node reads: its inputs, and what its subgraphs read from the outer scope."""
    read = {i for i in node.input if i}
    for _, g in subgraphs(node):
        read |= outer_reads(g)
    return read


def all_reads(model: onnx.ModelProto) -> set[str]:
    """Every tensor some top-level node reads, subgraphs' outer-scope reads included."""
    return set().union(*(node_reads(n) for n in model.graph.node))


def _constants(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant" and n.output}


def subgraph_layers(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(node name, reason)`` for every layer-like node (a ``LAYER_OPS`` node with a constant weight) inside a
    subgraph: the probe and the quantizers work on the top-level graph only, so these stay as they are."""
    found: list[tuple[str, str]] = []

    def walk(graph: onnx.GraphProto, consts: set[str], where: str) -> None:
        consts = consts | _constants(graph)
        for node in graph.node:
            if where and node.op_type in LAYER_OPS and len(node.input) > 1 and node.input[1] in consts:
                found.append((node.name or f"{node.op_type} node", f"inside {where}: {NOT_ANALYSED}"))
            for attr, sub in subgraphs(node):
                here = f"the '{attr}' of {node.op_type} node '{node.name}'"
                walk(sub, consts, f"{here}, within {where}" if where else here)

    walk(model.graph, set(), "")
    return found


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
    groups: int = 1  # Conv / ConvTranspose ``group`` attribute


def to_oik(layer: OnnxLayer, w):
    """A weight as the layer stores it, in the engine's (out, in, *kernel) layout (numpy or torch)."""
    if layer.op == "ConvTranspose":
        return swap_transposed_conv_layout(w, layer.groups)
    return w.T if layer.transposed else w


def from_oik(layer: OnnxLayer, w):
    """The inverse of ``to_oik``: an (out, in, *kernel) weight in the layer's stored layout."""
    return to_oik(layer, w)  # both are involutions: a transpose, or the same regrouping


def dynamic_skip_reason(node: onnx.NodeProto) -> str | None:
    """Why onnxruntime's dynamic int8 (``MatMulInteger``, which ``quantize_dynamic`` builds for MatMul only)
    cannot run a layer node, or None: a Gemm must be plain enough to be rewritten as MatMul [+ Add]."""
    if node.op_type in CONV_OPS:
        return DYNAMIC_CONV_REASON
    if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0):
        return "dynamic int8 runs a Gemm as MatMul + Add, which needs alpha=1 and no transA"
    return None


def find_layers(model: onnx.ModelProto) -> list[OnnxLayer]:
    """Top-level Conv / ConvTranspose / Gemm / MatMul nodes with a constant weight, in graph order (layers
    inside subgraphs: ``subgraph_layers``)."""
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
        layers.append(OnnxLayer(node.name, node.op_type, i, w.name, transposed, bias, node.input[0], node.output[0],
                                int(_attr(node, "group", 1))))
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
    """Every top-level tensor computed from ``start`` (through subgraphs that read it too)."""
    reached = {start}
    for node in model.graph.node:  # topological order: one pass suffices
        if node_reads(node) & reached:
            reached.update(o for o in node.output if o)
    return reached
