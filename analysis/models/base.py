"""What the engine needs from a model backend, whatever the framework."""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from analysis.errors import ModelError

__all__ = ["LayerInfo", "ModelAdapter", "ModelError", "Recompute"]


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer, named by the framework's fully qualified name."""

    name: str
    type: str
    order: int  # position in execution order on the task's inputs
    weight_shape: tuple[int, ...]
    has_bias: bool
    params: int  # weight + bias elements
    macs: int  # multiply-accumulates per sample on the task's input shape
    in_features: int  # K: inputs per output element (conv: in/groups * kernel)
    out_features: int
    input_group: str = ""  # layers reading the same tensor share a group (named after its first reader)

    @property
    def weight_shape_str(self) -> str:
        return "x".join(str(d) for d in self.weight_shape)


class Recompute(Protocol):
    """Optional capability: one FP32 forward per batch keeps what jobs reuse, then a single-layer job
    recomputes only what lies downstream of its layer. Jobs on a batch run in ``order``; the cache keeps
    only what later jobs read, and ``carry`` is what the next chunk on the same batch starts from."""

    def order(self, layer: str) -> int: ...  # jobs on a batch run in ascending order

    def start(self, x, layers: list[str], carried=None) -> object: ...  # the batch's cache for jobs on ``layers``

    def output(self, cache) -> object: ...  # the batch's FP32 output

    def carry(self, cache) -> object: ...  # handed to ``start`` of the next chunk on the same batch

    def rerun(self, cache, layer: str, fmt: str, x) -> tuple[object, object, object]: ...  # (y, out, FP32 out)

    def cost(self, layer: str) -> float: ...  # share of a full forward a job on ``layer`` recomputes

    def reaches_output(self) -> dict[str, bool]: ...


class ModelAdapter(Protocol):
    """What the engine needs from a model, whatever the framework (``TorchModel``, ``OnnxModel``).

    The engine drives a model only through these: it never touches torch modules or ONNX graphs.
    Optional: ``incremental(x) -> (Recompute | None, reason)`` for downstream-only recomputation;
    ``structure() -> models.structure.Structure``, which layers feed each layer (the Model view's edges).
    """

    name: str
    kind: str
    source: str
    sha256: str
    act_quant: dict  # (layer, format) -> quant.act.ActQuant, filled by the engine's calibration
    out_quant: dict  # (layer, format) -> quant.act.ActQuant requantizing the layer's output (static kernels)
    formats: dict  # format name -> QuantFormat: the analysis' own overrides of the registry

    def layers(self) -> list[LayerInfo]: ...

    def skip_reason(self, name: str, fmt) -> str | None: ...

    def weight(self, name: str): ...  # FP32 weight in (out, in, *kernel) layout, a torch tensor

    def fake_weight(self, name: str, fmt): ...

    def other_bytes(self) -> int: ...

    def params(self) -> int: ...

    def activation_stats(self, calib_batches): ...  # -> quant.act.ActivationStats

    def quantized(self, policy: dict[str, str]) -> AbstractContextManager: ...  # apply reversibly

    def evaluating(self) -> AbstractContextManager: ...  # held while a sweep measures

    def forward(self, x, capture=()) -> tuple[object, dict]: ...  # (output, {layer: layer output})

    def reaches_output(self, x) -> dict[str, bool]: ...

    def run(self, batch, policy: dict[str, str] | None = None): ...
