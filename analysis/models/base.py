"""What the engine needs from a model backend, whatever the framework."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class ModelError(ValueError):
    """A model that cannot be loaded or analysed; the message names the file or field."""


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


class ModelAdapter(Protocol):
    name: str
    kind: str
    source: str
    sha256: str

    def layers(self) -> list[LayerInfo]: ...

    def run(self, batch, policy: dict[str, str] | None = None): ...
