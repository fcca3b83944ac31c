"""Pick layers for a policy edit, and match the layers of two Runs: pure functions over Runs and Projectors.

What the dashboard's bulk actions and its Compare page compute, without any UI: a policy is one
format code per layer in execution order (``fp32=0, int8=1, int4=2``), as everywhere in ``project``.
Selections say what was asked for; formats a layer cannot take are left to ``Projector.sanitize``,
which keeps those layers at fp32 and says why.

    >>> codes = with_format(codes, layers_of_type(run, "Linear"), "int8")  # every Linear layer at INT8
    >>> codes = fp32_for_most_sensitive(Projector(run), 3, "int4")  # the 3 most sensitive FP32, the rest INT4
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.project.projection import Projector
from analysis.store.policy import FORMAT_CODE
from analysis.store.run import Run

SIDES = ("A", "B")


def _code(fmt: str | int) -> int:
    if isinstance(fmt, str):
        if fmt not in FORMAT_CODE:
            raise KeyError(f"unknown format {fmt!r}; known: {', '.join(sorted(FORMAT_CODE))}")
        return FORMAT_CODE[fmt]
    if int(fmt) not in FORMAT_CODE.values():
        raise KeyError(f"unknown format code {fmt}; known: {sorted(FORMAT_CODE.values())}")
    return int(fmt)


def _layer_table(run: Run) -> pd.DataFrame:
    return run.layers.sort_values("order", kind="stable")


def layer_types(run: Run) -> list[str]:
    """The layer types of the Run's layers table, sorted."""
    return sorted(_layer_table(run)["type"].astype(str).unique().tolist())


def layers_of_type(run: Run, types: str | Iterable[str]) -> np.ndarray:
    """Boolean mask, one entry per layer in execution order: the layers whose type is in ``types``.

    Read from the Run's layers table (its ``type`` column), so any type name works, spaces included.
    """
    wanted = {types} if isinstance(types, str) else set(types)
    return _layer_table(run)["type"].astype(str).isin(wanted).to_numpy()


def with_format(codes: np.ndarray, select: np.ndarray, fmt: str | int) -> np.ndarray:
    """A copy of ``codes`` with the selected layers (a boolean mask or layer indices) at ``fmt``.

    Raises:
        KeyError: ``fmt`` is not a policy format.
        ValueError: a boolean mask of another length than ``codes``.
    """
    code = _code(fmt)
    out = np.array(codes, dtype=np.int8)
    select = np.asarray(select)
    if select.dtype == bool and select.shape != out.shape:
        raise ValueError(f"a mask of {select.size} layers does not fit a policy of {out.size} layers")
    out[select] = code
    return out


def most_sensitive(projector: Projector, n: int, fmt: str | int) -> np.ndarray:
    """Indices of the ``n`` layers with the largest per-layer penalty at ``fmt``, largest first.

    The penalty is the one the projection sums (``Projector.penalty``), so the ranking is the projection's
    own. Layers that cannot take ``fmt`` rank last; ties keep execution order.

    Raises:
        KeyError: ``fmt`` is not a policy format.
        ValueError: ``n`` is negative or more than the Run's layers.
    """
    code = _code(fmt)
    total = len(projector.names)
    if not 0 <= int(n) <= total:
        raise ValueError(f"n={n} must be between 0 and the Run's {total} layers")
    penalty = np.where(projector.allowed[:, code], projector.penalty[:, code], -np.inf)
    return np.argsort(-penalty, kind="stable")[: int(n)]


def fp32_for_most_sensitive(projector: Projector, n: int, fmt: str | int) -> np.ndarray:
    """Codes with the ``n`` layers most sensitive at ``fmt`` at fp32 and every other layer at ``fmt``.

    Layers that cannot take ``fmt`` are asked for it all the same: ``Projector.sanitize`` keeps them at
    fp32 and names why, as for any edit.
    """
    codes = np.full(len(projector.names), _code(fmt), dtype=np.int8)
    codes[most_sensitive(projector, n, fmt)] = FORMAT_CODE["fp32"]
    return codes


@dataclass(frozen=True)
class LayerMatch:
    """Two Runs' layers matched by name: the table and the layers only one Run has."""

    table: pd.DataFrame  # layer, in ("A" | "B" | "both"), then "Δloss <fmt> A" ..., "Δloss <fmt> B" ...
    only_a: list[str]  # Run A's execution order
    only_b: list[str]  # Run B's execution order

    @property
    def both(self) -> int:
        return len(self.table) - len(self.only_a) - len(self.only_b)


def _loss_deltas(run: Run, fmt: str) -> pd.Series:
    """Measured single-layer loss change at ``fmt``, indexed by layer name."""
    sens = run.sensitivity
    return sens[sens["format"] == fmt].drop_duplicates("layer", keep="last").set_index("layer")["loss_delta"]


def match_layers(a: Run, b: Run) -> LayerMatch:
    """Per-layer loss change of two Runs side by side, layers matched by name.

    Rows: Run A's layers in its execution order, then the layers only Run B has in B's order; ``in``
    says which Run has each. Columns ``Δloss <fmt> A`` / ``B`` for every format the Run measured
    (int8 before int4), empty where that Run lacks the layer. Linear in the layer count (hash joins).
    """
    names_a, names_b = a.layer_names, b.layer_names
    set_a, set_b = set(names_a), set(names_b)
    only_a = [n for n in names_a if n not in set_b]
    only_b = [n for n in names_b if n not in set_a]
    layers = [*names_a, *only_b]
    table = pd.DataFrame({"layer": layers,
                          "in": ["both" if n in set_b else "A" for n in names_a] + ["B"] * len(only_b)})
    formats = sorted(set(a.formats) | set(b.formats), reverse=True)
    for side, run in zip(SIDES, (a, b)):
        for fmt in formats:
            if fmt in run.formats:
                table[f"Δloss {fmt} {side}"] = _loss_deltas(run, fmt).reindex(layers).to_numpy(dtype=float)
    return LayerMatch(table, only_a, only_b)
