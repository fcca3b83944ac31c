"""What the engine compares: a model's outputs, whatever their structure, batch axis first.

Models return one tensor, a tuple, a list, a dict (Hugging Face ``ModelOutput``), or in ONNX
several named outputs; and the batch is not always the first axis (a CTC recogniser writes
``[T, N, C]``). ``OutputSpec`` is found once from the FP32 model: each output's batch axis
is the axis whose length follows the number of samples fed (for a fixed-batch model, the
axis as long as that batch). What the metric sees is then

* one output (the only one, or the one the user names): that output with its batch axis
  moved first, every element kept;
* several: each flattened per sample, divided by its FP32 root-mean-square on the first
  samples (so no output drowns the others), and concatenated.

Outputs with no batch axis (a scalar loss) and, beside float outputs, integer ones (argmax
labels) are left out with a note. ``combine`` checks that what it returns holds every element
of the outputs it compares.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from analysis.models.base import ModelError


def flatten_outputs(y, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor in a model's return value (tuple, list, dict, nested)."""
    if isinstance(y, torch.Tensor):
        return [(prefix, y)]
    if isinstance(y, dict):  # also transformers' ModelOutput (an OrderedDict without its None fields)
        out = []
        for k, v in y.items():
            out += flatten_outputs(v, str(k) if prefix == "output" else f"{prefix}.{k}")
        return out
    if isinstance(y, (tuple, list)):
        out = []
        for i, v in enumerate(y):
            out += flatten_outputs(v, f"{prefix}.{i}")
        return out
    return []  # None, numbers, strings: nothing to compare


@dataclass(frozen=True)
class OutputInfo:
    name: str
    shape: tuple[int, ...]  # as observed on the first samples
    dtype: str
    batch_axis: int | None  # None: no axis follows the samples (not compared)

    def layout(self) -> list:
        """The shape with ``"N"`` at the batch axis (as ``run.json`` records it)."""
        return ["N" if a == self.batch_axis else int(d) for a, d in enumerate(self.shape)]


@dataclass
class OutputSpec:
    """The model's outputs and which of them, along which axis, the metric compares."""

    outputs: list[OutputInfo]
    selected: list[int]
    scales: list[float]  # per selected output: FP32 RMS, used only when several are compared
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def combine(self, ys: list) -> torch.Tensor:
        """The metric's view of one batch from all outputs (tensors or arrays, in ``outputs`` order)."""
        parts = []
        for k, i in enumerate(self.selected):
            y = ys[i]
            y = torch.from_numpy(np.ascontiguousarray(y)) if not isinstance(y, torch.Tensor) else y
            y = y.float().movedim(self.outputs[i].batch_axis, 0)
            parts.append(y if len(self.selected) == 1 else y.reshape(y.shape[0], -1) / self.scales[k])
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        total = sum(int(np.prod(np.shape(ys[i]))) for i in self.selected)
        if out.numel() != total:  # a guard for future edits: nothing the model wrote may be dropped
            raise ModelError(f"compared {out.numel()} output elements of {total}")
        return out

    def describe(self) -> dict:
        """What ``run.json`` records under ``model.outputs``."""
        return {"outputs": [{"name": o.name, "shape": o.layout(), "dtype": o.dtype, "batch_axis": o.batch_axis,
                             "compared": i in self.selected} for i, o in enumerate(self.outputs)],
                "elements_per_sample": int(sum(math.prod(s for a, s in enumerate(self.outputs[i].shape)
                                                         if a != self.outputs[i].batch_axis) for i in self.selected)),
                "notes": list(self.notes)}


def find_batch_axes(shapes_a: list[tuple], n_a: int, shapes_b: list[tuple] | None, n_b: int | None,
                    names: list[str]) -> tuple[list[int | None], list[str]]:
    """Each output's batch axis from its shapes for ``n_a`` and ``n_b`` samples fed (``shapes_b`` None:
    a fixed batch of ``n_a``: the axis of that length), and notes on any choice that was not forced."""
    axes, notes = [], []
    for k, name in enumerate(names):
        sa = shapes_a[k]
        if shapes_b is not None:
            sb = shapes_b[k]
            cand = [a for a in range(len(sa)) if len(sb) == len(sa) and sa[a] == n_a and sb[a] == n_b
                    and all(sa[j] == sb[j] for j in range(len(sa)) if j != a)]
        else:
            cand = [a for a in range(len(sa)) if sa[a] == n_a]
        axes.append(cand[0] if cand else None)
        if len(cand) > 1:
            notes.append(f"output '{name}' {tuple(sa)}: axes {cand} all have the batch's length {n_a}; "
                         f"axis {cand[0]} taken as the batch axis")
        elif cand and cand[0] != 0:
            notes.append(f"output '{name}' {tuple(sa)}: batch axis {cand[0]}")
    return axes, notes


def output_spec(names: list[str], ys_a: list, n_a: int, ys_b: list | None, n_b: int | None,
                select: str | None = None, where: str = "model") -> OutputSpec:
    """The ``OutputSpec`` from the FP32 outputs for ``n_a`` and (for a dynamic batch) ``n_b`` samples.

    Raises:
        ModelError: ``select`` names no output, or no output has a batch axis. The message lists the outputs.
    """
    shapes_a = [tuple(np.shape(y)) for y in ys_a]
    axes, notes = find_batch_axes(shapes_a, n_a, None if ys_b is None else [tuple(np.shape(y)) for y in ys_b],
                                  n_b, names)
    dtypes = [str(y.dtype).replace("torch.", "") for y in ys_a]
    infos = [OutputInfo(n, s, d, a) for n, s, d, a in zip(names, shapes_a, dtypes, axes)]
    listing = ", ".join(f"'{o.name}' {o.shape}" for o in infos)
    if select is not None:
        if select not in names:
            raise ModelError(f"--output {select}: the {where} has no output of that name (it has {listing})")
        i = names.index(select)
        if axes[i] is None:
            raise ModelError(f"--output {select}: shape {shapes_a[i]} has no axis that follows the number of samples "
                             f"fed ({n_a}); it cannot be compared sample by sample")
        selected = [i]
    else:
        with_axis = [i for i, a in enumerate(axes) if a is not None]
        floats = [i for i in with_axis if "float" in dtypes[i] or "half" in dtypes[i]]
        selected = floats or with_axis
        if not selected:
            raise ModelError(f"{where}: no output has an axis that follows the number of samples fed "
                             f"({listing}); name one with --output")
        for i, o in enumerate(infos):
            if i not in selected:
                why = "no batch axis" if o.batch_axis is None else f"{o.dtype}, beside float outputs"
                notes.append(f"output '{o.name}' {o.shape} is not compared ({why})")
    scales = []
    for i in selected:
        y = ys_a[i]
        y = y.detach().double().numpy() if isinstance(y, torch.Tensor) else np.asarray(y, dtype=np.float64)
        rms = float(np.sqrt(np.mean(np.square(y)))) if y.size else 1.0
        scales.append(rms if math.isfinite(rms) and rms > 1e-12 else 1.0)
    if len(selected) > 1:
        notes.append(f"{len(selected)} outputs compared together, each divided by its FP32 RMS on the first samples")
    return OutputSpec(infos, selected, scales, notes)
