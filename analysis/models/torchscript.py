"""TorchScript archives (``torch.jit.save``): analysed as the ONNX graph they export to.

A loaded ScriptModule runs in the TorchScript interpreter: Python forward hooks on its submodules
are not supported (``NotImplementedError``), so inputs and outputs of a layer cannot be
quantized there, only weights. Its ONNX export (``torch.onnx.export(dynamo=False)``, the exporter
TorchScript was made for) can: the archive is exported once and analysed by the ONNX backend
(weights, calibrated activations and requantized outputs per layer, as onnxruntime runs them),
and verify and apply export it again the same way. Layer nodes are named after the archive's own
modules (``features.0``, ``head``), read from their weights' names, where the export keeps them.

Loading needs no unpickling of Python objects: an archive's pickles hold TorchScript values only,
restored by TorchScript's own reader (a ``torch.save``d state dict or whole model is refused by
``analysis.models.loading``). The archive's code runs in the TorchScript interpreter: analyse
archives you would run.

The Run's ``model.sha256`` is the archive file's hash.
"""
from __future__ import annotations

import hashlib
import io
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import torch

from analysis.data.batch import Inputs, sample_shapes, to_numpy
from analysis.models.base import ModelError
from analysis.models.onnx_graph import LAYER_OPS, constants_to_initializers, name_nodes
from analysis.models.onnx_io import bind_input
from analysis.models.onnx_model import OnnxModel

EXPORT_OPSET = 17


def is_torchscript(path: str | Path) -> bool:
    """A zip archive with TorchScript's ``code/`` and ``constants.pkl`` records (what ``torch.jit.save``
    writes; a ``torch.save``d file has neither)."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    try:
        with zipfile.ZipFile(p) as z:
            records = [n.split("/", 1)[1] for n in z.namelist() if "/" in n]
    except (zipfile.BadZipFile, OSError):
        return False
    return "constants.pkl" in records and any(r.startswith("code/") for r in records)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _name_layers_after_modules(model: onnx.ModelProto) -> int:
    """Rename each layer node whose weight is ``<module>.weight`` to ``<module>``; returns how many."""
    taken = {n.name for n in model.graph.node}
    inits = {t.name for t in model.graph.initializer}
    renamed = 0
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2:
            continue
        w = node.input[1]
        if w in inits and w.endswith(".weight") and (name := w[:-len(".weight")]) not in taken:
            taken.discard(node.name)
            node.name = name
            taken.add(name)
            renamed += 1
    return renamed


def torchscript_onnx(path: str | Path, example) -> tuple[onnx.ModelProto, str, list[str]]:
    """``(ONNX model, archive sha256, notes)``: the archive exported for the task's ``example`` samples
    (batch axis dynamic, and the sequence axis of int64 token ids).

    Raises:
        ModelError: not a readable TorchScript archive, an input the archive rejects, or an export
            that fails; the message names the file.
    """
    path = Path(path)
    if not is_torchscript(path):
        raise ModelError(f"{path}: not a TorchScript archive (expected a file written by torch.jit.save)")
    ex = to_numpy(example)
    if isinstance(ex, Inputs):
        raise ModelError(f"{path}: a TorchScript archive is fed one input here; the task has {len(ex.names)}")
    x = torch.from_numpy(np.ascontiguousarray(ex))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, its archives are not gone
            module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:  # the TorchScript reader raises RuntimeError for most problems
        raise ModelError(f"{path}: not a loadable TorchScript archive ({str(e).splitlines()[0][:200]})") from None
    try:
        with torch.no_grad():
            module(x)
    except Exception as e:
        raise ModelError(f"{path}: rejects the task's inputs of shape {tuple(x.shape[1:])} "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})") from None
    axes = {0: "batch", 1: "sequence"} if x.dim() == 2 and not x.is_floating_point() else {0: "batch"}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=EXPORT_OPSET, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": axes, "output": {0: "batch"}})
    except Exception as e:
        raise ModelError(f"{path}: torch.onnx cannot export the archive ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    model = onnx.load_from_string(buf.getvalue())
    constants_to_initializers(model)
    renamed = _name_layers_after_modules(model)
    name_nodes(model)
    notes = [f"TorchScript archive exported with torch.onnx (opset {EXPORT_OPSET}); "
             f"{renamed} layer(s) named after their modules"]
    return model, file_sha256(path), notes


class TorchScriptModel(OnnxModel):
    """The ONNX backend on a TorchScript archive's export; the Run records it as ``torchscript``."""

    kind = "torchscript"


def load_torchscript_model(path: str | Path, example, *, source_hint: str = "", output: str | None = None):
    """The adapter for a TorchScript archive, checked to accept ``example`` (samples of the task)."""
    model, sha, notes = torchscript_onnx(path, example)
    ex = to_numpy(example)
    binding = bind_input(model, sample_shapes(ex), f"{path} with {source_hint or 'the task'}")
    return TorchScriptModel(model, binding, ex, name=str(path), source=str(path), sha256=sha, notes=notes,
                            output=output)
