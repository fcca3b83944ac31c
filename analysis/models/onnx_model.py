"""ONNX backend: any ``.onnx`` model analysed in onnxruntime.

One "probe" graph serves every policy without rebuilding a session: each layer's weight
becomes a graph input (fed either the FP32 weight or its fake-quantized copy), and each
layer's input passes through ``QuantizeLinear -> DequantizeLinear`` with a calibrated
scale and zero point, selected by a per-layer switch (``Where``). That is how the
runtime quantizes an activation, so the sweep sees the rounding and clipping it will
see. Each layer's output gets the same behind its own switch: static integer kernels
write their output requantized to uint8. MatMul and Gemm layers also get
``DynamicQuantizeLinear -> DequantizeLinear`` behind a second switch, for dynamic
formats: the very operator the runtime runs, with its range taken from each tensor fed. Layer inputs and outputs are also graph outputs,
for statistics and output SQNR.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from analysis.quant.formats import QuantFormat, get_format
from analysis.models.base import LayerInfo, ModelError
from analysis.data.batch import repeat_to, sample_shapes, take, to_numpy
from analysis.models.structure import Structure, onnx_structure
from analysis.models.onnx_io import InputBinding, bind_input
from analysis.models.outputs import OutputSpec, output_spec
from analysis.models.onnx_graph import (OnnxLayer, downstream_tensors, dynamic_skip_reason, find_layers, from_oik,
                                        initializer_array, load_onnx, node_reads, shared_weights, subgraph_layers,
                                        to_oik)
from analysis.quant.act import ActivationStats, ActQuant, check_finite
from analysis.quant.primitives import (HIST_BINS, RangeObserver, StreamingHistogram, fake_quantize_weight, group_size_error,
                                       transposed_conv_error)

PROBE = "quantlens"


def session_options(threads: int = 1, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = level
    so.log_severity_level = 3  # no warnings about unused initializers on stderr
    return so


def probe_graph(model: onnx.ModelProto, layers: list[OnnxLayer]) -> tuple[onnx.ModelProto, dict[str, dict[str, str]]]:
    """The probe model and, per layer, the names of its feeds (weight, switch, scale, zero, the same three
    for the output: ``out_on``, ``out_scale``, ``out_zero``, and for layers dynamic formats can run, the
    dynamic switch ``dyn``)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    feeds: dict[str, dict[str, str]] = {}
    by_index = {l.index: (i, l) for i, l in enumerate(layers)}
    nodes, used_weights = [], set()
    for j, node in enumerate(g.node):
        after = []
        if j in by_index:
            i, l = by_index[j]
            f = {k: f"{PROBE}/{k}/{i}" for k in ("w", "on", "scale", "zero")}
            qa, dqa, xa = f"{PROBE}/q/{i}", f"{PROBE}/dq/{i}", f"{PROBE}/x/{i}"
            nodes += [helper.make_node("QuantizeLinear", [l.input, f["scale"], f["zero"]], [qa], name=f"{PROBE}/Q/{i}"),
                      helper.make_node("DequantizeLinear", [qa, f["scale"], f["zero"]], [dqa], name=f"{PROBE}/DQ/{i}"),
                      helper.make_node("Where", [f["on"], dqa, l.input], [xa], name=f"{PROBE}/Where/{i}")]
            if dynamic_skip_reason(node) is None:
                f["dyn"] = f"{PROBE}/dyn/{i}"
                dq = [f"{PROBE}/dynq/{i}/{k}" for k in ("q", "scale", "zero")]
                xd = f"{PROBE}/xd/{i}"
                nodes += [helper.make_node("DynamicQuantizeLinear", [l.input], dq, name=f"{PROBE}/DynQ/{i}"),
                          helper.make_node("DequantizeLinear", dq, [f"{PROBE}/dyndq/{i}"], name=f"{PROBE}/DynDQ/{i}"),
                          helper.make_node("Where", [f["dyn"], f"{PROBE}/dyndq/{i}", xa], [xd],
                                           name=f"{PROBE}/DynWhere/{i}")]
                g.input.append(helper.make_tensor_value_info(f["dyn"], TensorProto.BOOL, []))
                xa = xd
            node.input[0], node.input[1] = xa, f["w"]
            # the output too, as static integer kernels write it; downstream nodes read the switch's result
            f.update({k: f"{PROBE}/{k}/{i}" for k in ("out_on", "out_scale", "out_zero")})
            ya, qy, dqy = f"{PROBE}/y/{i}", f"{PROBE}/qy/{i}", f"{PROBE}/dqy/{i}"
            node.output[0] = ya
            after = [helper.make_node("QuantizeLinear", [ya, f["out_scale"], f["out_zero"]], [qy],
                                      name=f"{PROBE}/Qy/{i}"),
                     helper.make_node("DequantizeLinear", [qy, f["out_scale"], f["out_zero"]], [dqy],
                                      name=f"{PROBE}/DQy/{i}"),
                     helper.make_node("Where", [f["out_on"], dqy, ya], [l.output], name=f"{PROBE}/Wherey/{i}")]
            g.input.extend([helper.make_tensor_value_info(f["out_on"], TensorProto.BOOL, []),
                            helper.make_tensor_value_info(f["out_scale"], TensorProto.FLOAT, []),
                            helper.make_tensor_value_info(f["out_zero"], TensorProto.UINT8, [])])
            feeds[l.name] = f
            w = initializer_array(model, l.weight)
            g.input.extend([helper.make_tensor_value_info(f["w"], TensorProto.FLOAT, list(w.shape)),
                            helper.make_tensor_value_info(f["on"], TensorProto.BOOL, []),
                            helper.make_tensor_value_info(f["scale"], TensorProto.FLOAT, []),
                            helper.make_tensor_value_info(f["zero"], TensorProto.UINT8, [])])
        nodes += [node, *after]
        used_weights.update(node_reads(node))  # a subgraph may read a layer's weight from the outer scope
    del g.node[:]
    g.node.extend(nodes)
    fed = {l.weight for l in layers} - used_weights  # weights now fed as inputs
    keep = [t for t in g.initializer if t.name not in fed]
    del g.initializer[:]
    g.initializer.extend(keep)
    have = {o.name for o in g.output}
    for l in layers:
        for t in (l.input, l.output):
            if t not in have:
                g.output.append(helper.make_empty_tensor_value_info(t))
                g.output[-1].type.tensor_type.elem_type = TensorProto.FLOAT
                have.add(t)
    return m, feeds


class OnnxModel:
    """An ONNX model in onnxruntime plus what the engine knows about its layers."""

    kind = "onnx"

    def __init__(self, model: onnx.ModelProto, binding: InputBinding, example, *, name: str,
                 source: str, sha256: str, notes: list[str] | None = None, threads: int = 1,
                 output: str | None = None) -> None:
        self.model = model
        self.binding = binding
        self.name, self.source, self.sha256 = name, source, sha256
        self.notes = list(notes or [])
        self.act_quant: dict[tuple[str, str], ActQuant] = {}
        self.out_quant: dict[tuple[str, str], ActQuant] = {}  # (layer, format) -> requantization of the output
        self.formats: dict[str, QuantFormat] = {}  # this analysis' formats (observer/group overrides)
        self._policy: dict[str, str] = {}
        self.not_analysed: list[tuple[str, str]] = subgraph_layers(model)  # (node, reason): inside If/Loop/Scan
        self._olayers = find_layers(model)
        if not self._olayers and self.not_analysed:
            node, why = self.not_analysed[0]
            raise ModelError(f"{source}: no quantizable layers outside subgraphs; the {len(self.not_analysed)} found are "
                             f"inside them, which are not analysed (first: '{node}', {why.rsplit(': ', 1)[0]})")
        if not self._olayers:
            raise ModelError(f"{source}: no quantizable layers (Conv, ConvTranspose, Gemm or MatMul with a constant weight)")
        self.by_name = {l.name: l for l in self._olayers}
        self.shared = shared_weights(self._olayers)
        if self.shared:
            self.notes.append("weights shared between layers: " + "; ".join(
                f"{w} by {', '.join(n)}" for w, n in self.shared.items()))
        self.output_names = [o.name for o in model.graph.output]
        self._axes: dict[str, int] = {}  # graph output -> its batch axis, once known
        probe, self.feeds = probe_graph(model, self._olayers)
        try:
            self.session = ort.InferenceSession(probe.SerializeToString(), session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelError(f"{source}: onnxruntime cannot load the model ({str(e).splitlines()[0][:200]})") from None
        self._weights = {l.name: initializer_array(model, l.weight).astype(np.float32) for l in self._olayers}
        self._fake: dict[tuple[str, str], np.ndarray] = {}
        self._base_feed = {}
        for l in self._olayers:
            f = self.feeds[l.name]
            self._base_feed.update({f["w"]: self._weights[l.name], f["on"]: np.array(False),
                                    f["scale"]: np.array(1.0, np.float32), f["zero"]: np.array(0, np.uint8),
                                    f["out_on"]: np.array(False), f["out_scale"]: np.array(1.0, np.float32),
                                    f["out_zero"]: np.array(0, np.uint8)})
            if "dyn" in f:
                self._base_feed[f["dyn"]] = np.array(False)
        self.outputs: OutputSpec = self._find_outputs(example, output)
        self._layers = self._discover(example)

    # ---- running -------------------------------------------------------------------------------
    def _feed(self, policy: dict[str, str] | None) -> dict[str, np.ndarray]:
        feed = dict(self._base_feed)
        for name, fmt_name in (policy or {}).items():
            fmt = self.format(fmt_name)
            if fmt.is_float or self.skip_reason(name, fmt):
                continue
            f = self.feeds[name]
            if fmt.weight is not None:
                feed[f["w"]] = self._fake_stored(name, fmt)
            if fmt.is_dynamic:
                feed[f["dyn"]] = np.array(True)
            elif fmt.activation is not None:
                aq = self.act_quant[(name, fmt.name)]
                feed[f["on"]] = np.array(True)
                feed[f["scale"]] = np.array(float(aq.scale), np.float32)
                feed[f["zero"]] = np.array(int(aq.zero), np.uint8)
            if (oq := self.out_quant.get((name, fmt.name))) is not None:
                feed[f["out_on"]] = np.array(True)
                feed[f["out_scale"]] = np.array(float(oq.scale), np.float32)
                feed[f["out_zero"]] = np.array(int(oq.zero), np.uint8)
        return feed

    def run_outputs(self, x, names: list[str], policy: dict[str, str] | None = None) -> list[np.ndarray]:
        """The named tensors for a batch (any size: fixed-batch models are fed in pieces, joined along each
        output's batch axis, the padding cut off where that axis is known)."""
        base = self._feed(policy)
        return run_in_pieces(lambda ns, piece: self.session.run(ns, {**base, **piece}), self.binding, x, names,
                             self._axes)

    def _find_outputs(self, example, select: str | None) -> OutputSpec:
        base = self._feed(None)
        spec = find_output_spec(lambda ns, piece: self.session.run(ns, {**base, **piece}), self.binding,
                                self.output_names, example, select, self.source)
        self._axes = {o.name: o.batch_axis for o in spec.outputs if o.batch_axis is not None}
        return spec

    def run(self, batch, policy: dict[str, str] | None = None) -> torch.Tensor:
        """What the metric compares for a batch under ``policy`` (``outputs``)."""
        return self.outputs.combine(self.run_outputs(batch, self.output_names, policy))

    def format(self, name: str) -> QuantFormat:
        """The format this model uses under ``name``: an override set by the analysis, else the registry's."""
        return self.formats.get(name) or get_format(name)

    @contextmanager
    def quantized(self, policy: dict[str, str]):
        """Apply ``{layer: format}`` to every ``forward`` in the block (the feeds change, not the graph)."""
        saved, self._policy = self._policy, {**self._policy, **policy}
        try:
            yield self
        finally:
            self._policy = saved

    def evaluating(self):
        return nullcontext()

    def forward(self, x, capture=()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The output for a batch under the policy applied now, and the outputs of the ``capture`` layers."""
        capture = list(capture)
        k = len(self.output_names)
        ys = self.run_outputs(x, self.output_names + [self.by_name[n].output for n in capture], self._policy)
        as_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
        return self.outputs.combine(ys[:k]), {n: as_torch(y) for n, y in zip(capture, ys[k:])}

    # ---- layers --------------------------------------------------------------------------------
    def _discover(self, example) -> list[LayerInfo]:
        """Layers with their cost per sample, from one piece of the example the model accepts."""
        piece, _ = next(self.binding.feeds(take(to_numpy(example), slice(0, 2))))
        n = len(next(iter(piece.values())))
        outs = self.session.run([l.output for l in self._olayers], {**self._feed(None), **piece})
        spread = [l.input for l in self._olayers if l.op == "ConvTranspose"]  # MACs follow its input, not output
        ins = dict(zip(spread, self.session.run(spread, {**self._feed(None), **piece}))) if spread else {}
        infos = []
        for order, (l, y) in enumerate(zip(self._olayers, outs)):
            W = self.weight(l.name)
            bias = initializer_array(self.model, l.bias).size if l.bias else 0
            k = int(np.prod(W.shape[1:]))
            per_sample = y.size // n if y.ndim > 1 else y.size
            macs = per_sample * k
            if l.input in ins:  # each input element meets out/groups * kernel weights
                macs = ins[l.input].size // n * int(np.prod(self._weights[l.name].shape[1:]))
            infos.append(LayerInfo(name=l.name, type=l.op, order=order, weight_shape=tuple(W.shape), has_bias=bool(l.bias),
                                   params=W.numel() + bias, macs=int(macs), in_features=k,
                                   out_features=int(W.shape[0])))
        return infos

    def layers(self) -> list[LayerInfo]:
        return list(self._layers)

    def layer(self, name: str) -> LayerInfo:
        for info in self._layers:
            if info.name == name:
                return info
        raise KeyError(f"unknown layer '{name}'")

    def skip_reason(self, name: str, fmt: QuantFormat) -> str | None:
        if fmt.is_dynamic and (why := dynamic_skip_reason(self.model.graph.node[self.by_name[name].index])):
            return why
        if fmt.weight is None:
            return None
        l = self.by_name[name]
        if l.op == "ConvTranspose" and (why := transposed_conv_error(l.groups, fmt.weight)):
            return why
        return group_size_error(self.layer(name).weight_shape, fmt.weight)

    def weight(self, name: str) -> torch.Tensor:
        """The layer's FP32 weight in (out, in, *kernel) layout."""
        w = self._weights[name]
        return torch.from_numpy(np.ascontiguousarray(to_oik(self.by_name[name], w)))

    def fake_weight(self, name: str, fmt: QuantFormat) -> torch.Tensor:
        return torch.from_numpy(self._fake_engine(name, fmt))

    def _fake_engine(self, name: str, fmt: QuantFormat) -> np.ndarray:
        key = (name, fmt.name)
        if key not in self._fake:
            self._fake[key] = fake_quantize_weight(self.weight(name), fmt.weight).float().numpy()
        return self._fake[key]

    def _fake_stored(self, name: str, fmt: QuantFormat) -> np.ndarray:
        return np.ascontiguousarray(from_oik(self.by_name[name], self._fake_engine(name, fmt)))

    def other_bytes(self) -> int:
        """Bytes of initializers outside the layers' weights and biases (shared ones counted once)."""
        layer_tensors = {l.weight for l in self._olayers} | {l.bias for l in self._olayers if l.bias}
        total = 0
        for t in self.model.graph.initializer:
            if t.name not in layer_tensors:
                total += int(np.prod(t.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        return total

    def params(self) -> int:
        return int(sum(int(np.prod(t.dims)) for t in self.model.graph.initializer
                       if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)))

    def reaches_output(self, x=None) -> dict[str, bool]:
        compared = {self.outputs.outputs[i].name for i in self.outputs.selected}
        return {l.name: bool(compared & downstream_tensors(self.model, l.output)) for l in self._olayers}

    def structure(self) -> Structure:
        """Which layers feed each layer, from the graph's node list."""
        return onnx_structure(self.model, [l.name for l in self._olayers])

    # ---- engine hooks --------------------------------------------------------------------------
    def activation_stats(self, calib_batches):
        """Streamed input/output ranges, then 2048-bin histograms, of every layer (two passes)."""
        keys = [(l.name, t, getattr(l, "input" if t == "input" else "output")) for l in self._olayers
                for t in ("input", "output")]
        names = sorted({k[2] for k in keys})
        ranges = {(n, t): RangeObserver() for n, t, _ in keys}
        for x in calib_batches():
            vals = dict(zip(names, self.run_outputs(x, names)))
            for n, t, tensor in keys:
                ranges[(n, t)].update(torch.from_numpy(vals[tensor]))
        check_finite(ranges)
        hists = {k: StreamingHistogram(r.lo, r.hi, HIST_BINS) for k, r in ranges.items()}
        for x in calib_batches():
            vals = dict(zip(names, self.run_outputs(x, names)))
            for n, t, tensor in keys:
                hists[(n, t)].update(torch.from_numpy(vals[tensor]))
        return ActivationStats(ranges, hists)


def run_in_pieces(run, binding: InputBinding, x, names: list[str], axes: dict[str, int]) -> list[np.ndarray]:
    """``run(names, feed)`` over a batch of any size: a fixed-batch model is fed in pieces, joined along each
    tensor's batch axis (``axes``, else 0), the padding cut off where that axis has the batch's length."""
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for piece, n in binding.feeds(x):
        for acc, name, y in zip(parts, names, run(names, piece)):
            if binding.batch is not None and n < binding.batch and y.ndim:
                axis = axes.get(name, 0)
                y = np.take(y, np.arange(n), axis=axis) if y.shape[axis] == binding.batch else y
            acc.append(y)
    return [p[0] if len(p) == 1 or p[0].ndim == 0 else np.concatenate(p, axis=axes.get(name, 0))
            for p, name in zip(parts, names)]  # a 0-d output (a loss) has no samples to join: the first piece's


def find_output_spec(run, binding: InputBinding, names: list[str], example, select: str | None,
                     where: str) -> OutputSpec:
    """Which outputs the metric compares, along which axis (``analysis.models.outputs``): from runs on 2 and
    3 samples (a shorter example's samples repeated), or for a fixed batch, the axis as long as the batch.

    Raises:
        ModelError: onnxruntime rejects the inputs, or no output can be compared sample by sample.
    """
    ex = repeat_to(to_numpy(example), 3)
    try:
        if binding.batch is None:
            na, nb = 2, 3
            ys_a = run(names, binding.first_feed(take(ex, slice(0, na))))
            ys_b = run(names, binding.first_feed(take(ex, slice(0, nb))))
        else:
            na, nb, ys_b = binding.batch, None, None
            ys_a = run(names, binding.first_feed(ex))
    except Exception as e:
        raise ModelError(f"{where}: onnxruntime rejects the task's inputs of shape {sample_shapes(ex)} "
                         f"({str(e).splitlines()[0][:200]})") from None
    return output_spec(names, ys_a, na, ys_b, nb, select, where=where)


def load_onnx_model(path: str | Path, example, *, source_hint: str = "", output: str | None = None) -> OnnxModel:
    """The ONNX adapter for a file, checked to accept ``example`` (samples of the task: an array, or
    named arrays for several inputs).

    Raises:
        ModelError: unreadable file, missing external data, unsupported opset, an input the
            task's data does not bind, or no quantizable layer. The message names the file.
    """
    path = Path(path)
    model, sha, notes = load_onnx(path)
    ex = to_numpy(example)
    binding = bind_input(model, sample_shapes(ex), f"{path} with {source_hint or 'the task'}")
    return OnnxModel(model, binding, ex, name=path.stem, source=str(path), sha256=sha, notes=notes, output=output)
