"""Quantization formats: plain frozen configs and a registry by name.

A format says how a layer's weight and (optionally) its input activation are
quantized. Granularity is a value object that documents the scale shape it
produces. Formats do not know how they are applied; the sweep, the size model
and the exporters look them up by name.

Built-in formats:

* ``fp32`` -- the layer is left alone.
* ``int8`` -- W8A8: weights symmetric int8 per output channel (codes in
  [-127, 127], one fp32 scale per channel), input activation asymmetric uint8
  per tensor from calibration (one fp32 scale and one uint8 zero point).
* ``int4`` -- W4A16: weights asymmetric uint4 group-wise along the input
  dimension (codes in [0, 15], groups of 32, one fp32 scale and one 4-bit zero
  point per group), activations left in floating point. This is the layout of
  onnxruntime's ``MatMulNBits`` with its default (asymmetric) settings.
* ``int8-dyn`` -- W8A8 with the input quantized at run time, as onnxruntime's
  ``quantize_dynamic`` runs it (``DynamicQuantizeLinear`` + ``MatMulInteger``):
  weights as ``int8``; the input of each call asymmetric uint8 with ONE scale and
  zero point over the whole tensor fed (not per row: onnxruntime's dynamic kernels
  are per tensor), so the result depends on the batch. Nothing is calibrated.
  MatMul / Gemm / Linear only; convolutions take static ``int8``.

Example:
    >>> register_format(QuantFormat("int8w", "int8 weight-only",
    ...     weight=WeightSpec(8, symmetric=True, granularity=PerChannel(0))))
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Union

OBSERVERS = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor: scale shape ``()``."""

    kind: str = field(default="per_tensor", init=False)


@dataclass(frozen=True)
class PerChannel:
    """One scale per slice along ``axis``: scale shape ``(W.shape[axis],)``."""

    axis: int = 0
    kind: str = field(default="per_channel", init=False)


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``group_size`` consecutive input elements of each output row.

    For a weight viewed as ``(out, K)`` (conv kernels flattened to ``K = in*kh*kw``)
    the scale shape is ``(out, K // group_size)``. ``group_size`` must divide ``K``.
    """

    group_size: int = 32
    kind: str = field(default="per_group", init=False)

    def __post_init__(self) -> None:
        if self.group_size < 2 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size={self.group_size} must be a power of two >= 2")


Granularity = Union[PerTensor, PerChannel, PerGroup]


@dataclass(frozen=True)
class WeightSpec:
    bits: int
    symmetric: bool
    granularity: Granularity

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"weight bits={self.bits} must be in 2..8")


@dataclass(frozen=True)
class ActivationSpec:
    """How a layer's input is quantized: per tensor, from a calibrated range, or (``dynamic``) from
    the min and max of each tensor at run time, in which case ``observer`` is not used."""

    bits: int = 8
    symmetric: bool = False
    observer: str = "minmax"
    dynamic: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"activation bits={self.bits} must be in 2..8")
        if self.observer not in OBSERVERS:
            raise ValueError(f"unknown observer '{self.observer}'; known: {', '.join(OBSERVERS)}")
        if self.dynamic and (self.bits != 8 or self.symmetric):
            raise ValueError("dynamic activations are asymmetric 8-bit (onnxruntime's DynamicQuantizeLinear)")


@dataclass(frozen=True)
class QuantFormat:
    name: str
    description: str
    weight: WeightSpec | None = None
    activation: ActivationSpec | None = None

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.activation is None

    @property
    def is_dynamic(self) -> bool:
        """The input is quantized at run time (no calibrated range)."""
        return self.activation is not None and self.activation.dynamic

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["activation"] is not None and not d["activation"]["dynamic"]:
            del d["activation"]["dynamic"]  # static specs keep the dict (and the sweep keys) older Runs hold
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantFormat":
        """Inverse of ``to_dict`` (formats travel to worker processes as plain data)."""
        w = d.get("weight")
        a = d.get("activation")
        weight = None
        if w is not None:
            g = dict(w["granularity"])
            kind = g.pop("kind")
            gran = {"per_tensor": PerTensor, "per_channel": PerChannel, "per_group": PerGroup}[kind](**g)
            weight = WeightSpec(w["bits"], w["symmetric"], gran)
        act = ActivationSpec(**a) if a is not None else None
        return cls(d["name"], d["description"], weight, act)


_REGISTRY: dict[str, QuantFormat] = {}


def register_format(fmt: QuantFormat, *, replace: bool = False) -> QuantFormat:
    """Add a format to the registry; the sweep and the size model pick it up by name."""
    if fmt.name in _REGISTRY and not replace:
        raise ValueError(f"format '{fmt.name}' is already registered")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> QuantFormat:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown format '{name}'; known: {', '.join(sorted(_REGISTRY))}") from None


def known_formats() -> list[str]:
    return sorted(_REGISTRY)


def with_observer(fmt: QuantFormat, observer: str) -> QuantFormat:
    """The same format with another activation observer (weights are unaffected; dynamic inputs have none)."""
    if fmt.activation is None or fmt.activation.dynamic:
        return fmt
    act = ActivationSpec(fmt.activation.bits, fmt.activation.symmetric, observer)
    return QuantFormat(fmt.name, fmt.description, fmt.weight, act)


def with_group_size(fmt: QuantFormat, group_size: int) -> QuantFormat:
    """The same format with another weight group size (only for per-group formats)."""
    if fmt.weight is None or not isinstance(fmt.weight.granularity, PerGroup):
        return fmt
    w = WeightSpec(fmt.weight.bits, fmt.weight.symmetric, PerGroup(group_size))
    return QuantFormat(fmt.name, fmt.description, w, fmt.activation)


FP32 = register_format(QuantFormat("fp32", "32-bit float (unquantized)"))
INT8 = register_format(
    QuantFormat(
        "int8",
        "W8A8: int8 weights per output channel (symmetric), uint8 input activation per tensor",
        weight=WeightSpec(8, symmetric=True, granularity=PerChannel(0)),
        activation=ActivationSpec(8, symmetric=False, observer="minmax"),
    )
)
INT4 = register_format(
    QuantFormat(
        "int4",
        "W4A16: uint4 weights in groups of 32 along the input dimension, float activations",
        weight=WeightSpec(4, symmetric=False, granularity=PerGroup(32)),
    )
)
INT8_DYN = register_format(
    QuantFormat(
        "int8-dyn",
        "W8A8 dynamic: int8 weights per output channel (symmetric), uint8 input quantized at run time "
        "per tensor (onnxruntime DynamicQuantizeLinear + MatMulInteger); MatMul/Gemm only",
        weight=WeightSpec(8, symmetric=True, granularity=PerChannel(0)),
        activation=ActivationSpec(8, symmetric=False, observer="minmax", dynamic=True),
    )
)
DYNAMIC_CONV_REASON = "dynamic int8 runs MatMul/Gemm only; convolutions take static int8"
