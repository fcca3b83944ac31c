"""Where the Model view draws each layer: blocks from the name hierarchy in execution order, top to bottom;
inside a block, a layer one level below the block's layers that feed it, side by side with its parallel
branches (q, k, v). Pure: names and the Run's ``fed_by`` in, coordinates and edges out (no Streamlit, no plotly).

A layer's *block* is its name up to the first numbered part that is not the name's last
(``encoder.layer.3.attention.self.query`` -> ``encoder.layer.3``; ONNX ``/encoder/layer.3/attention/...`` the
same), else its parent (``pooler.dense`` -> ``pooler``), else the top level. Consecutive layers of one block
form a band; a block met again later in execution order gets a band of its own, so bands keep execution order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

BAND_GAP = 0.7  # vertical space between two bands, in levels
X_STEP = 1.7  # horizontal distance between side-by-side layers
TOP = ""  # block of names without hierarchy


def name_parts(name: str) -> list[str]:
    """A layer name's parts: torch ``a.b.3.c``, ONNX ``/a/b.3/c/MatMul``."""
    return [p for p in re.split(r"[./]", name) if p]


def block_of(name: str) -> str:
    """The block a layer belongs to (see the module's docstring)."""
    parts = name_parts(name)
    for k, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[:k + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else TOP


def short_labels(names: list[str], block: str) -> list[str]:
    """The shortest suffix of each name (past its block) that no other name of the band shares."""
    tails = [name_parts(n)[len(name_parts(block)) if block else 0:] or name_parts(n) for n in names]
    out = []
    for t in tails:
        for k in range(1, len(t) + 1):
            s = t[-k:]
            if sum(1 for u in tails if u[-k:] == s) == 1 or k == len(t):
                out.append(".".join(s))
                break
    return out


@dataclass(frozen=True)
class Band:
    """Consecutive layers of one block: ``rows`` (execution order), drawn between ``y_top`` and ``y_bottom``."""

    block: str
    rows: np.ndarray
    y_top: float
    y_bottom: float


@dataclass
class ModelLayout:
    names: list[str]
    x: np.ndarray  # per layer
    y: np.ndarray  # per layer (top is 0, going down)
    step: np.ndarray  # global level index (no gaps): an edge spanning more than one is a skip
    band: np.ndarray  # per layer, index into ``bands``
    bands: list[Band]
    labels: list[str]  # short name within its band
    edges: np.ndarray  # (E, 2) int: (feeding layer, fed layer)
    has_dataflow: bool

    @property
    def skip(self) -> np.ndarray:
        """Per edge: True where it passes over at least one level (a residual or other skip branch)."""
        if not len(self.edges):
            return np.zeros(0, dtype=bool)
        return (self.step[self.edges[:, 1]] - self.step[self.edges[:, 0]]) > 1

    def feeders(self, i: int) -> list[int]:
        return self.edges[self.edges[:, 1] == i, 0].tolist()


def model_layout(names: list[str], fed_by: dict[str, list[str]] | None,
                 input_group: list[str] | None = None) -> ModelLayout:
    """Coordinates and edges for layers ``names`` (execution order).

    Args:
        fed_by: per layer, the layers feeding it (``Run.fed_by()``); None when the Run records no dataflow:
            then a layer sits one level below the previous one, except layers reading one tensor
            (``input_group``), which sit side by side, and no edges are drawn.
    """
    n = len(names)
    index = {nm: i for i, nm in enumerate(names)}
    blocks = [block_of(nm) for nm in names]
    band = np.zeros(n, dtype=np.int64)
    starts = [0]
    for i in range(1, n):
        if blocks[i] != blocks[i - 1]:
            starts.append(i)
        band[i] = len(starts) - 1
    starts.append(n)
    src, dst = [], []
    if fed_by is not None:
        for i, nm in enumerate(names):
            for f in fed_by.get(nm, []):
                j = index.get(f)
                if j is not None and j != i:
                    src.append(j)
                    dst.append(i)
    edges = np.array([src, dst], dtype=np.int64).T.reshape(-1, 2)
    feeders: list[list[int]] = [[] for _ in range(n)]
    for j, i in edges:
        feeders[i].append(int(j))
    level = np.zeros(n, dtype=np.int64)
    for b in range(len(starts) - 1):
        lo, hi = starts[b], starts[b + 1]
        for i in range(lo, hi):
            if fed_by is not None:
                inside = [level[j] for j in feeders[i] if lo <= j < i]
                level[i] = 1 + max(inside) if inside else 0
            elif i > lo:
                same = input_group is not None and input_group[i] == input_group[i - 1]
                level[i] = level[i - 1] if same else level[i - 1] + 1
    x, y, step = np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64)
    bands, labels = [], [""] * n
    top, base_step = 0.0, 0
    for b in range(len(starts) - 1):
        rows = np.arange(starts[b], starts[b + 1])
        depth = int(level[rows].max()) + 1
        for lv in range(depth):
            at = rows[level[rows] == lv]
            x[at] = (np.arange(len(at)) - (len(at) - 1) / 2) * X_STEP
        y[rows] = -(top + level[rows])
        step[rows] = base_step + level[rows]
        for r, lab in zip(rows, short_labels([names[r] for r in rows], blocks[rows[0]])):
            labels[r] = lab
        bands.append(Band(blocks[rows[0]], rows, -top + 0.5, -(top + depth - 1) - 0.5))
        top += depth + BAND_GAP
        base_step += depth
    return ModelLayout(list(names), x, y, step, band, bands, labels, edges, fed_by is not None)


def band_window(layout: ModelLayout, first: int, last: int) -> np.ndarray:
    """Rows of bands ``first`` to ``last`` (inclusive, clipped), in execution order."""
    first, last = max(first, 0), min(last, len(layout.bands) - 1)
    return np.concatenate([layout.bands[b].rows for b in range(first, last + 1)]) if first <= last else np.zeros(0, int)
