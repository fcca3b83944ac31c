"""Layers that must share a format: those reading one tensor share its quantizer in the runtime."""
from __future__ import annotations


def coupled_groups(run) -> list[list[int]]:
    """Layer indices (execution order) that read one tensor, from the layers table's ``input_group``."""
    if "input_group" not in run.layers.columns:
        return []
    layers = run.layers.sort_values("order").reset_index(drop=True)
    groups: dict[str, list[int]] = {}
    for i, g in enumerate(layers["input_group"]):
        if isinstance(g, str) and g:
            groups.setdefault(g, []).append(i)
    return [v for v in groups.values() if len(v) > 1]
