"""The model and data behind a Run, brought back for onnxruntime (apply, verify, latency).

A Run records where its model came from (``model.name``/``model.source``) and a content
hash (``model.sha256``); the model is re-resolved from that and must hash the same.
Torch models are exported to ONNX (``torch.onnx.export``), and each exported node is
mapped back to its torch module explicitly: by initializer name (``<module>.weight``),
else by identical weight values.
"""
from __future__ import annotations

import inspect
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from analysis.models.base import ModelError
from analysis.models.onnx_io import InputBinding, bind_input
from analysis.models.onnx_graph import (OnnxLayer, constants_to_initializers, find_layers,
                                        initializer_array, load_onnx, name_nodes)
from analysis.data.batch import repeat_to, sample_shapes, take, to_numpy, to_torch
from analysis.models.onnx_model import find_output_spec, run_in_pieces
from analysis.models.outputs import OutputSpec, find_batch_axes, flatten_outputs
from analysis.store.run import Run
from analysis.data.tasks import BUNDLED_TASKS, Task, load_task
from analysis.errors import InputError
from analysis.quant.formats import QuantFormat

EXPORT_OPSET = 17


class RuntimeModelError(InputError):
    """The model or data of a Run is not at hand (or is not the one analysed); the message says which."""


@dataclass
class RuntimeModel:
    """An FP32 ONNX model, its layers, and the Run's layer names for them."""

    model: onnx.ModelProto
    layers: list[OnnxLayer]
    binding: InputBinding
    to_onnx: dict[str, str]  # Run layer name -> ONNX node name
    source: str
    exported: bool
    notes: list[str] = field(default_factory=list)
    outputs: OutputSpec | None = None  # what the metric compares, as the sweep compared it

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.graph.output]

    def compared(self, run_fn, x) -> torch.Tensor:
        """What the metric compares for samples ``x``, with ``run_fn(names, feed)`` (an onnxruntime session's run)."""
        axes = {o.name: o.batch_axis for o in self.outputs.outputs if o.batch_axis is not None}
        return self.outputs.combine(run_in_pieces(run_fn, self.binding, x, self.output_names, axes))

    @property
    def by_onnx(self) -> dict[str, OnnxLayer]:
        return {l.name: l for l in self.layers}

    def onnx_policy(self, policy: dict[str, str]) -> dict[str, str]:
        """A policy keyed by Run layer names, re-keyed by ONNX node names."""
        return {self.to_onnx[k]: v for k, v in policy.items() if k in self.to_onnx}

    def onnx_quantizers(self, run: Run, policy: dict[str, str]) -> dict[str, dict[str, tuple[float, int]]]:
        """``stored_quantizers`` of the Run for ``policy``, keyed by ONNX node names."""
        return {self.to_onnx[k]: v for k, v in stored_quantizers(run, policy).items() if k in self.to_onnx}


def run_formats(run: Run) -> dict[str, QuantFormat]:
    """The formats exactly as the Run measured them (group size, observer, ...), from ``run.json``."""
    return {name: QuantFormat.from_dict(d) for name, d in (run.meta.get("format_specs") or {}).items()}


def stored_quantizers(run: Run, policy: dict[str, str]) -> dict[str, dict[str, tuple[float, int]]]:
    """The engine's activation quantizers for ``{layer: format}``, from the Run's ``clipping`` table:
    ``{layer: {"input" | "output": (scale, zero point)}}``. A Run from before they were stored has none
    (onnxruntime then calibrates those tensors itself)."""
    clip = run.clipping
    if "scale" not in clip.columns:
        return {}
    out: dict[str, dict[str, tuple[float, int]]] = {}
    rows = clip[clip["tensor"].isin(("input", "output")) & clip["scale"].notna()]
    for layer, tensor, fmt, scale, zero in rows[["layer", "tensor", "format", "scale", "zero_point"]].itertuples(
            index=False, name=None):
        if policy.get(layer) == fmt:
            out.setdefault(layer, {})[tensor] = (float(scale), int(zero))
    return out


def export_torch(module: torch.nn.Module, example, output_names: list[str] | None = None,
                 output_axes: dict[str, int] | None = None) -> onnx.ModelProto:
    """FP32 ONNX of a torch module, batch (and token-sequence) dimensions dynamic, weights inline.

    ``example`` is a batch (a tensor, or a dict of tensors by argument name); ``output_names`` name the
    flattened outputs (tuple, list and dict outputs become several graph outputs, in that order) and
    ``output_axes`` their batch axes (default: the first)."""
    buf = io.BytesIO()
    if isinstance(example, dict):  # the exporter orders graph inputs as forward() takes them: names must follow
        order = [p for p in inspect.signature(module.forward).parameters if p in example]
        example = {k: example[k] for k in order + [k for k in example if k not in order]}
    inputs = example if isinstance(example, dict) else {"input": example}
    # token ids (N, L): the sequence length varies between batches too
    in_axes = {k: {0: "batch", 1: "sequence"} if v.dim() == 2 and not v.is_floating_point() else {0: "batch"}
               for k, v in inputs.items()}
    args, kwargs = ((), dict(example)) if isinstance(example, dict) else ((example,), None)
    out_names = output_names or ["output"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # the TorchScript exporter needs no extra packages and keeps parameter names
            torch.onnx.export(module.eval(), args, buf, kwargs=kwargs, dynamo=False, opset_version=EXPORT_OPSET,
                              input_names=list(inputs), output_names=out_names,
                              dynamic_axes={**in_axes, **{n: {(output_axes or {}).get(n, 0): "batch"}
                                                          for n in out_names}})
        except Exception as legacy_error:
            buf = io.BytesIO()
            try:
                dims = {k: {0: torch.export.Dim("batch")} for k in inputs}
                torch.onnx.export(module.eval(), args, buf, kwargs=kwargs, dynamo=True, external_data=False,
                                  input_names=list(inputs), output_names=out_names,
                                  dynamic_shapes=dims if kwargs else (dims["input"],))
            except Exception as e:
                raise ModelError(f"torch.onnx.export failed ({type(legacy_error).__name__}: "
                                 f"{str(legacy_error).splitlines()[0][:120]}; dynamo: {str(e).splitlines()[0][:120]})") from None
    model = onnx.load_from_string(buf.getvalue())
    constants_to_initializers(model)
    name_nodes(model)
    return model


def map_to_torch(model: onnx.ModelProto, layers: list[OnnxLayer], module: torch.nn.Module,
                 names: list[str]) -> dict[str, str]:
    """Torch module name -> ONNX node name for the Run's layers (by parameter name, else by value)."""
    mods = dict(module.named_modules())
    out: dict[str, str] = {}
    taken: set[str] = set()
    for l in layers:
        if l.weight.endswith(".weight") and l.weight[:-7] in names and l.weight[:-7] not in out:
            out[l.weight[:-7]] = l.name
            taken.add(l.name)
    for name in names:
        if name in out:
            continue
        W = mods[name].weight.detach().float().numpy()
        for l in layers:
            if l.name in taken:
                continue
            w = initializer_array(model, l.weight)
            w = w.T if l.transposed else w
            if w.shape == W.shape and np.array_equal(w, W):
                out[name] = l.name
                taken.add(l.name)
                break
    return out


def _resolve_torch(run: Run, example) -> RuntimeModel:
    from analysis.models.loading import load_torch_model
    from analysis.models.torch_model import state_sha256

    m = run.meta["model"]
    spec, source = m["name"], m["source"]
    weights = m.get("weights") or (source.split(" + ", 1)[1] if " + " in source else None)
    try:
        module, _, _ = load_torch_model(spec, weights)
    except ModelError as e:
        raise RuntimeModelError(f"model '{spec}' of Run {run.path} is not at hand: {e}") from None
    if state_sha256(module) != m["sha256"]:
        raise RuntimeModelError(f"model '{source}' no longer matches Run {run.path} (sha256 differs from the analysed model)")
    call = lambda x: module(**x) if isinstance(x, dict) else module(x)  # noqa: E731
    with torch.no_grad():
        outs = [flatten_outputs(call(take(repeat_to(example, 3), slice(0, n)))) for n in (2, 3)]
    names = [k for k, _ in outs[0]]
    axes, _ = find_batch_axes([tuple(t.shape) for _, t in outs[0]], 2, [tuple(t.shape) for _, t in outs[1]], 3, names)
    model = export_torch(module.eval(), example, names, {n: a for n, a in zip(names, axes) if a is not None})
    layers = find_layers(model)
    to_onnx = map_to_torch(model, layers, module, run.layer_names)
    binding = bind_input(model, sample_shapes(to_numpy(example)), f"exported {spec}")
    missing = [n for n in run.layer_names if n not in to_onnx]
    notes = [f"exported with torch.onnx (opset {EXPORT_OPSET})"]
    if missing:
        notes.append(f"{len(missing)} layer(s) have no node in the export and stay fp32: {', '.join(missing[:10])}")
    return RuntimeModel(model, layers, binding, to_onnx, source, True, notes)


def _resolve_onnx(run: Run, example) -> RuntimeModel:
    m = run.meta["model"]
    path = Path(m["source"])
    if not path.is_file():
        raise RuntimeModelError(f"model file '{path}' (recorded in {run.path / 'run.json'}) is not at hand")
    try:
        if m.get("kind") == "torchscript":  # a TorchScript archive, exported again as the sweep exported it
            from analysis.models.torchscript import torchscript_onnx

            model, sha, notes = torchscript_onnx(path, example)
        else:
            model, sha, notes = load_onnx(path)
    except ModelError as e:
        raise RuntimeModelError(str(e)) from None
    if sha != m["sha256"]:
        raise RuntimeModelError(f"model file '{path}' has changed since Run {run.path} was analysed (sha256 differs)")
    layers = find_layers(model)
    binding = bind_input(model, sample_shapes(to_numpy(example)), str(path))
    return RuntimeModel(model, layers, binding, {l.name: l.name for l in layers}, str(path), False, notes)


def resolve_model(run: Run, task: Task | None = None) -> RuntimeModel:
    """The Run's model as FP32 ONNX, checked against the recorded sha256.

    Raises:
        RuntimeModelError: the model (file, factory, weights) is missing or has changed.
    """
    task = task or resolve_task(run)
    example = to_torch(task.eval_inputs[:3])
    onnx_kinds = ("onnx", "torchscript")
    rm = _resolve_onnx(run, example) if run.meta["model"].get("kind") in onnx_kinds else _resolve_torch(run, example)
    from analysis.runtime.latency import session

    fp32 = session(rm.model, 1)
    rm.outputs = find_output_spec(lambda names, feed: fp32.run(names, feed), rm.binding, rm.output_names,
                                  task.eval_inputs[:3], run.meta["model"].get("output_arg"), rm.source)
    return rm


def resolve_task(run: Run) -> Task:
    """The Run's task data (bundled task or ``.npz``), checked against the recorded sha256.

    Raises:
        RuntimeModelError: the data file is missing or has changed.
    """
    d = run.meta.get("data", {})
    name, source = d.get("task", ""), d.get("source", "")
    spec = name if name in BUNDLED_TASKS else source
    if not spec or (spec == source and not Path(source).exists()):
        raise RuntimeModelError(f"task data '{source or name}' (recorded in {run.path / 'run.json'}) is not at hand")
    n_calib = d.get("n_calib")
    calib = d["calib_arg"] if "calib_arg" in d else (
        n_calib if spec == source and n_calib and not _has_calib(source) else None)
    try:
        task = load_task(spec, metric=run.meta["metric"]["name"], calib=calib, seed=int(run.meta.get("seed", 0)),
                         model=run.meta["model"].get("name"), options=d.get("options"))
    except ValueError as e:
        raise RuntimeModelError(f"task data of Run {run.path}: {e}") from None
    if name in BUNDLED_TASKS and n_calib and n_calib < len(task.calib_inputs):
        task.calib_inputs = task.calib_inputs[:n_calib]
    if d.get("sha256") and task.sha256 != d["sha256"]:
        raise RuntimeModelError(f"task data '{source}' has changed since Run {run.path} was analysed (sha256 differs)")
    return task


def _has_calib(path: str) -> bool:
    with np.load(path, allow_pickle=False) as z:
        return "calib_inputs" in z.files
