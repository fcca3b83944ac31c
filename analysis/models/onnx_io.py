"""How a task's arrays feed an ONNX model's inputs: names, dtypes, fixed batch sizes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from analysis.models.base import ModelError


def real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


@dataclass(frozen=True)
class InputBinding:
    """How the task's arrays feed the model's one input: dtype, and a fixed batch size if any."""

    name: str
    dtype: np.dtype
    batch: int | None  # None: the batch dimension is dynamic
    sample_shape: tuple  # per-sample dims, None where symbolic

    def chunks(self, x: np.ndarray):
        """The batch cut into pieces the model accepts (the last one padded, with its true length)."""
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if self.batch is None:
            yield x, len(x)
            return
        for s in range(0, len(x), self.batch):
            part = x[s:s + self.batch]
            n = len(part)
            if n < self.batch:
                part = np.concatenate([part, np.repeat(part[-1:], self.batch - n, axis=0)])
            yield part, n


def bind_input(model: onnx.ModelProto, sample_shape: tuple[int, ...], where: str) -> InputBinding:
    """Check that task inputs of ``sample_shape`` bind the model's single input.

    Raises:
        ModelError: several inputs, or a rank or dimension the data does not match.
    """
    ins = real_inputs(model)
    if len(ins) != 1:
        raise ModelError(f"{where}: the model has {len(ins)} inputs ({', '.join(i.name for i in ins)}); "
                         f"a task feeds exactly one")
    vi = ins[0]
    tt = vi.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] if tt.HasField("shape") else None
    if dims is None:
        return InputBinding(vi.name, dtype, None, tuple(sample_shape))
    want = ("batch", *sample_shape)
    if len(dims) != len(sample_shape) + 1:
        raise ModelError(f"{where}: model input '{vi.name}' has rank {len(dims)} "
                         f"({_shape_str(tt)}); the task's inputs are (N, {', '.join(map(str, sample_shape))})")
    for i, (d, s) in enumerate(zip(dims[1:], sample_shape), start=1):
        if d is not None and d != s:
            raise ModelError(f"{where}: model input '{vi.name}' expects dimension {i} = {d} ({_shape_str(tt)}); "
                             f"the task's inputs have {s} (shape {tuple(want)})")
    batch = dims[0] if dims[0] else None
    return InputBinding(vi.name, dtype, batch, tuple(d for d in dims[1:]))


def _shape_str(tt) -> str:
    return "(" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim) + ")"
