"""Per-layer kernel time from one profiled run of a whole model, as onnxruntime optimised it.

onnxruntime at ``ORT_ENABLE_ALL`` fuses and renames nodes (a Conv with its Relu becomes one
``/Relu_output_0_nchwc`` node, a Gemm with its activation ``fused /fc1/Gemm``, a quantized layer
``/conv2/Conv_quant_token_6``), so the profile's node names are not the model's. Each node of the
optimised graph (saved beside the profile) is attributed to a layer by what it carries:

* its name, or an output's name, starts with the layer's node name or the layer's output tensor
  (``/conv2/Conv_quant``, ``/conv2/Conv_output_0_DequantizeLinear``, ``/fc1/Gemm_Q4``);
* an input is the layer's weight or bias, or made from them (``conv2.weight_quantized``,
  ``conv2.bias``, ``/fc1/Gemm/weight_KxN_Q4``);
* a quantize / dequantize node attached to such nodes only (the ``QuantizeLinear`` of a layer's
  input, shared by the layers that read it, is split evenly between them).

The longest matching key wins, so ``/a/Conv_1`` is never taken for ``/a/Conv``.

Nodes of no layer (activations, LayerNorm, pooling, layout reorders) are *attached* to the nearest
layer upstream of them (``attach``): quantizing a layer changes them too (its Relu folds into the
requantization, a pooling after it runs on uint8 in another layout), and comparing what is attached
to a layer in a format's model with what is attached to it in the FP32 model gives that change.
"""
from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from analysis.models.onnx_graph import OnnxLayer

GLUE_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def _matches(s: str, key: str) -> bool:
    return s == key or s.startswith(key + "_") or s.startswith(key + "/")


def attribute(model: onnx.ModelProto, layers: list[OnnxLayer]) -> dict[str, list[str]]:
    """Optimised node name -> the layers it works for (one, or those sharing it)."""
    name_keys = [(l.name, l.name) for l in layers] + [(l.output, l.name) for l in layers]
    input_keys = [(l.weight, l.name) for l in layers] + [(l.bias, l.name) for l in layers if l.bias]
    owner: dict[str, list[str]] = {}

    def best(cands: list[tuple[str, str]]) -> str | None:
        return max(cands, key=lambda kv: len(kv[0]))[1] if cands else None

    for n in model.graph.node:
        cands = [(k, l) for k, l in name_keys for s in (n.name, *n.output) if s and _matches(s, k)]
        cands += [(k, l) for k, l in input_keys for s in n.input if s and _matches(s, k)]
        cands += [(l.name, l.name) for l in layers for s in n.input if s.startswith(l.name + "/")]
        if (who := best(cands)) is not None:
            owner[n.name] = [who]
    producer = {o: n for n in model.graph.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    for _ in range(3):  # glue next to glue (Q -> DQ -> layer) needs a pass per hop
        for n in model.graph.node:
            if n.name in owner or n.op_type not in GLUE_OPS:
                continue
            after = [c for o in n.output for c in consumers.get(o, [])]
            if after and all(c.name in owner for c in after):
                owner[n.name] = sorted({l for c in after for l in owner[c.name]})
                continue
            before = [producer[i] for i in n.input[:1] if i in producer]
            if before and before[0].name in owner:
                owner[n.name] = list(owner[before[0].name])
    return owner


def attach(model: onnx.ModelProto, owner: dict[str, list[str]]) -> dict[str, list[str]]:
    """Nodes of no layer -> the layer upstream of them: the owner (or attachment) of the node producing
    their first computed input, in graph order. Nodes upstream of every layer stay out."""
    producer = {o: n.name for n in model.graph.node for o in n.output if o}
    attached: dict[str, list[str]] = {}
    for n in model.graph.node:  # topological: a producer is decided before its consumers
        if n.name in owner:
            continue
        for i in n.input:
            src = producer.get(i)
            who = owner.get(src) or attached.get(src) if src else None
            if who:
                attached[n.name] = list(who)
                break
    return attached


def profile(model: onnx.ModelProto, feed: dict[str, np.ndarray], *, threads: int = 1, repeats: int = 20,
            warmup: int = 3) -> tuple[dict[str, list[float]], dict[str, str], onnx.ModelProto]:
    """Kernel times (ms per run, one entry per timed repeat) by node of the optimised graph at
    ``ORT_ENABLE_ALL``, each node's operator, and that optimised graph."""
    def options() -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # the NCHWc serialisation warning: the file is read here, on this machine
        return so

    data = model.SerializeToString()
    with tempfile.TemporaryDirectory(prefix="quantlens-prof-") as tmp:
        # the optimised graph comes from a session of its own: a session that writes it does not pre-pack
        # weights, and its kernels (MatMulNBits most) run slower than deployed ones
        so = options()
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(Path(tmp) / "optimized.onnx"))
        so = options()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        for _ in range(warmup + repeats):
            s.run(None, feed)
        events = json.loads(Path(s.end_profiling()).read_text())
    times: dict[str, list[float]] = defaultdict(list)
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            times[name].append(e["dur"] / 1e3)
            ops[name] = (e.get("args") or {}).get("op_name", "?")
    return {k: v[warmup:] if len(v) > warmup else v for k, v in times.items()}, ops, optimized


def layer_kernel_times(times: dict[str, list[float]], ops: dict[str, str], owner: dict[str, list[str]],
                       layers: list[OnnxLayer]) -> dict[str, tuple[float, float, str]]:
    """Per layer: (median ms, interquartile range ms, its kernels) over the profiled repeats."""
    per: dict[str, list[str]] = defaultdict(list)
    for node, who in owner.items():
        if node in times:
            for l in who:
                per[l].append(node)
    out = {}
    for l in layers:
        nodes = per.get(l.name)
        if not nodes:
            continue
        reps = min(len(times[n]) for n in nodes)
        sums = np.array([sum(times[n][r] / len(owner[n]) for n in nodes) for r in range(reps)])
        q1, med, q3 = np.percentile(sums, [25, 50, 75])
        kernels = "+".join(sorted({ops.get(n, "?") for n in nodes}))
        out[l.name] = (float(med), float(q3 - q1), kernels)
    return out
