"""Turn a MODEL argument into a torch module: a bundled demo, a Hugging Face folder
(``analysis.models.hf``), or ``package.module:factory``.

Checkpoint files are refused with a hint: they hold weights, not an architecture, and a
pickled whole model would run arbitrary code when loaded. TorchScript archives are the
exception: they hold their architecture as TorchScript, and are analysed through their ONNX
export (``analysis.models.torchscript``).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
from torch import nn

from analysis.data.batch import to_numpy, to_torch
from analysis.models.base import ModelError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".safetensors")
DEMO_TASKS = {"demo:digits": "digits", "demo:minilm": "minilm"}  # each demo model with its own task


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file or a ``torch.save``d state dict (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: empty file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors come in many types
        msg = str(e).splitlines()[0][:200]
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ModelError(f"{path}: refusing to unpickle: it holds code or objects beyond plain tensors "
                             f"({msg}); save model.state_dict() or export the model to ONNX") from None
        raise ModelError(f"{path}: not a readable torch checkpoint ({msg})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: expected a state dict of tensors")
    return obj


def _factory(spec: str) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # factories in the user's working folder
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelError(f"model '{spec}': cannot import module '{mod_name}' ({e})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ModelError(f"model '{spec}': module '{mod_name}' has no attribute '{attr}'")
    model = fn() if callable(fn) and not isinstance(fn, nn.Module) else fn
    if not isinstance(model, nn.Module):
        raise ModelError(f"model '{spec}': the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_torch_model(spec: str, weights: str | Path | None = None) -> tuple[nn.Module, str, str]:
    """``(module, name, source)`` for a MODEL argument.

    Args:
        spec: ``demo:digits``, ``demo:minilm`` or ``package.module:factory`` (a function returning a module).
        weights: optional state dict applied to the factory's module (strict).
    """
    if spec.startswith("demo:"):
        if spec == "demo:digits":
            from analysis.data.demos import DIGITS_WEIGHTS, digits_model

            return digits_model(), spec, str(DIGITS_WEIGHTS.relative_to(DIGITS_WEIGHTS.parents[2]))
        if spec == "demo:minilm":
            from analysis.data.minilm import minilm_model, weights_source

            return minilm_model(), spec, weights_source()
        raise ModelError(f"unknown demo model '{spec}'; known: {', '.join(DEMO_TASKS)}")
    path = Path(spec)
    if path.is_dir() and (path / "config.json").is_file():  # a Hugging Face model folder
        if weights is not None:
            raise ModelError(f"--weights {weights}: {spec} is a Hugging Face folder that holds its own weights")
        from analysis.models.hf import load_hf_model

        return load_hf_model(spec)
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        if not path.exists():
            raise ModelError(f"{spec}: no such file")
        load_state_dict(path)  # refuses pickles with code, names a corrupt file
        raise ModelError(f"{spec}: a checkpoint holds weights, not an architecture; pass "
                         f"'package.module:factory' and --weights {spec}")
    if path.suffix.lower() == ".onnx":
        raise ModelError(f"{spec}: an ONNX file, not a torch model (use load_model)")
    if ":" not in spec:
        if path.exists():
            raise ModelError(f"{spec}: not a model (expected demo:NAME, package.module:factory, a .onnx file, a "
                             f"TorchScript archive or a Hugging Face folder with config.json)")
        raise ModelError(f"{spec}: no such file, and not of the form demo:NAME or package.module:factory")
    model = _factory(spec)
    if weights is not None:
        sd = load_state_dict(weights)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ModelError(f"{weights}: does not fit model '{spec}' ({str(e).splitlines()[0][:200]})") from None
    return model, spec, spec if weights is None else f"{spec} + {weights}"


def load_model(spec: str, example, *, weights: str | Path | None = None, source_hint: str = "",
               output: str | None = None):
    """The model adapter for a MODEL argument, checked to accept ``example`` (a few samples of the task:
    an array, or named arrays for a model with several inputs; at least 3 let the batch axis of each
    output be told from the others).

    ``.onnx`` files get the onnxruntime backend; everything else the torch backend. ``output`` names
    the output the metric compares when the model has several (default: all of them).

    Raises:
        ModelError: the model cannot be loaded, has no quantizable layers, or rejects the inputs.
    """
    if Path(spec).suffix.lower() == ".onnx":
        if Path(spec).is_dir():
            raise ModelError(f"{spec}: a directory, not an ONNX file")
        if not Path(spec).is_file():
            raise ModelError(f"{spec}: no such file")
        if weights is not None:
            raise ModelError(f"--weights {weights}: applies to 'package.module:factory' models; {spec} is an ONNX "
                             f"file that holds its own weights")
        from analysis.models.onnx_model import load_onnx_model

        return load_onnx_model(spec, example, source_hint=source_hint, output=output)
    from analysis.models.torchscript import is_torchscript

    if Path(spec).suffix.lower() in CHECKPOINT_SUFFIXES and is_torchscript(spec):  # analysed as its ONNX export
        if weights is not None:
            raise ModelError(f"--weights {weights}: {spec} is a TorchScript archive that holds its own weights")
        from analysis.models.torchscript import load_torchscript_model

        return load_torchscript_model(spec, example, source_hint=source_hint, output=output)
    from analysis.models.torch_model import TorchModel

    module, name, source = load_torch_model(spec, weights)
    return TorchModel(module.eval(), to_torch(to_numpy(example)), name=name, source=source, output=output)
