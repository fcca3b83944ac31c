"""How a task's arrays feed an ONNX model's inputs: names, dtypes, fixed batch sizes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from analysis.data.batch import Inputs, to_numpy
from analysis.models.base import ModelError


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, dtype and per-sample dims (None where symbolic)."""

    name: str
    dtype: np.dtype
    sample_shape: tuple


@dataclass(frozen=True)
class InputBinding:
    """How the task's arrays feed the model's inputs: which array goes to which input, in which
    dtype, and in pieces of the model's fixed batch size if it has one."""

    inputs: tuple[InputSpec, ...]
    batch: int | None  # None: the batch dimension is dynamic
    named: bool  # the task holds named arrays (``Inputs``), not one plain array

    @property
    def name(self) -> str:
        return self.inputs[0].name

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def _arrays(self, x) -> dict[str, np.ndarray]:
        x = to_numpy(x)
        arrays = x.arrays if isinstance(x, Inputs) else {self.inputs[0].name: x}
        return {i.name: np.ascontiguousarray(arrays[i.name], dtype=i.dtype) for i in self.inputs}

    def feeds(self, x):
        """``(feed dict, true length)`` pieces the model accepts (a fixed batch's last piece padded by
        repeating its last sample)."""
        arrays = self._arrays(x)
        n_all = len(next(iter(arrays.values())))
        if self.batch is None:
            yield arrays, n_all
            return
        for s in range(0, n_all, self.batch):
            feed, n = {}, 0
            for k, a in arrays.items():
                part = a[s:s + self.batch]
                n = len(part)
                if n < self.batch:
                    part = np.concatenate([part, np.repeat(part[-1:], self.batch - n, axis=0)])
                feed[k] = part
            yield feed, n

    def chunks(self, x):
        """For a model with one input: ``(array, true length)`` pieces, as ``feeds`` cuts them."""
        for feed, n in self.feeds(x):
            yield feed[self.inputs[0].name], n

    def first_feed(self, x) -> dict[str, np.ndarray]:
        """The first piece ``feeds`` gives (timing runs one batch the model accepts)."""
        return next(self.feeds(x))[0]


def _dims(vi: onnx.ValueInfoProto) -> list | None:
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None
    # a dimension written as -1 or 0 (some exporters) is as dynamic as a named one
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]


def bind_input(model: onnx.ModelProto, sample_shape, where: str) -> InputBinding:
    """Check that task inputs of ``sample_shape`` (a tuple for one array, ``{name: tuple}`` for named
    arrays) bind the model's inputs.

    Raises:
        ModelError: an input the task does not feed, an array no input takes, a rank or dimension the
            data does not match, or inputs with different fixed batch sizes. The message names the input.
    """
    ins = real_inputs(model)
    model_names = [i.name for i in ins]
    named = isinstance(sample_shape, dict)
    if not named:
        if len(ins) != 1:
            raise ModelError(f"{where}: the model has {len(ins)} inputs ({', '.join(model_names)}); the task holds "
                             f"one array: save one array per input name in the .npz ({', '.join(model_names)})")
        shapes = {ins[0].name: tuple(sample_shape)}
    else:
        missing = [n for n in model_names if n not in sample_shape]
        if missing:
            raise ModelError(f"{where}: model input '{missing[0]}' is not in the task (it holds "
                             f"{', '.join(sample_shape)}; the model takes {', '.join(model_names)})")
        extra = [n for n in sample_shape if n not in model_names]
        if extra:
            raise ModelError(f"{where}: the task's array '{extra[0]}' is not an input of the model "
                             f"(it takes {', '.join(model_names)})")
        shapes = {n: tuple(sample_shape[n]) for n in model_names}
    specs, batches = [], {}
    for vi in ins:
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        have = shapes[vi.name]
        dims = _dims(vi)
        if dims is None:
            specs.append(InputSpec(vi.name, dtype, have))
            continue
        if len(dims) != len(have) + 1:
            raise ModelError(f"{where}: model input '{vi.name}' has rank {len(dims)} "
                             f"({_shape_str(tt)}); the task's inputs are (N, {', '.join(map(str, have))})")
        for i, (d, s) in enumerate(zip(dims[1:], have), start=1):
            if d is not None and d != s:
                raise ModelError(f"{where}: model input '{vi.name}' expects dimension {i} = {d} ({_shape_str(tt)}); "
                                 f"the task's inputs have {s} (shape {('batch', *have)})")
        if dims[0] is not None:
            batches[vi.name] = dims[0]
        specs.append(InputSpec(vi.name, dtype, tuple(dims[1:])))
    if len(set(batches.values())) > 1:
        raise ModelError(f"{where}: inputs declare different fixed batch sizes ("
                         + ", ".join(f"'{k}' {v}" for k, v in batches.items()) + ")")
    batch = next(iter(batches.values()), None)
    return InputBinding(tuple(specs), batch, named)


def _shape_str(tt) -> str:
    return "(" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim) + ")"
