"""Samples for a model with several inputs: one batch-first array per input name.

A task for a model with one input holds a plain array ``(N, ...)``; a task for a model with
several holds an ``Inputs``: named arrays of the same length ``N``, sliced together. Batches
handed to a model are the torch side of either: a tensor, or a dict of tensors by input name.
The helpers here take both, so code that only counts, slices or converts samples need not ask.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

from analysis.errors import InputError


class Inputs:
    """Named batch-first arrays of the same length, sliced together (``x[a:b]``, ``x[index_array]``)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        if not arrays:
            raise InputError("a task needs at least one input array")
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise InputError("input arrays have different numbers of samples: "
                             + ", ".join(f"'{k}' {n}" for k, n in lengths.items()))
        self.arrays = dict(arrays)

    @property
    def names(self) -> list[str]:
        return list(self.arrays)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, idx) -> "Inputs":
        return Inputs({k: v[idx] for k, v in self.arrays.items()})

    def __repr__(self) -> str:
        return "Inputs(" + ", ".join(f"{k}: {v.dtype}{tuple(v.shape)}" for k, v in self.arrays.items()) + ")"


Samples = Union[np.ndarray, Inputs]
Batch = Union[torch.Tensor, dict]  # the torch side: a tensor, or {input name: tensor}


def to_torch(x: Samples) -> Batch:
    """A model's batch from samples: a tensor, or a dict of tensors by input name."""
    if isinstance(x, Inputs):
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in x.arrays.items()}
    return torch.from_numpy(np.ascontiguousarray(x))


def to_numpy(x) -> Samples:
    """Samples from a batch (or samples): arrays, named when there are several inputs."""
    if isinstance(x, Inputs):
        return x
    if isinstance(x, dict):
        return Inputs({k: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for k, v in x.items()})
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def batch_len(x) -> int:
    """Samples in a batch of either kind."""
    if isinstance(x, dict):
        return int(next(iter(x.values())).shape[0])
    return len(x)


def take(x, idx):
    """The same samples of every input: ``x[idx]`` for a tensor, array, dict or ``Inputs``."""
    if isinstance(x, dict):
        return {k: v[idx] for k, v in x.items()}
    return x[idx]


def sample_shapes(x: Samples) -> dict[str, tuple[int, ...]] | tuple[int, ...]:
    """Per-sample shape: a tuple for one input, ``{name: tuple}`` for several."""
    if isinstance(x, Inputs):
        return {k: tuple(v.shape[1:]) for k, v in x.arrays.items()}
    return tuple(x.shape[1:])


def describe_shape(x: Samples) -> list | dict:
    """The per-sample shape as ``run.json`` records it (``data.input_shape``)."""
    s = sample_shapes(x)
    return {k: list(v) for k, v in s.items()} if isinstance(s, dict) else list(s)


def arrays_of(x: Samples) -> dict[str, np.ndarray]:
    """``{name: array}``; a single unnamed input is named ``inputs`` (its field in a task ``.npz``)."""
    return dict(x.arrays) if isinstance(x, Inputs) else {"inputs": x}


def repeat_to(x, n: int):
    """At least ``n`` samples: ``x`` itself when it has them, else its samples repeated in turn (an output's
    batch axis is told by feeding 2 and 3 samples, whatever the task holds)."""
    have = batch_len(x)
    if have >= n:
        return x
    idx = np.arange(n) % have
    if isinstance(x, dict):
        return {k: v[torch.as_tensor(idx)] if isinstance(v, torch.Tensor) else v[idx] for k, v in x.items()}
    return x[torch.as_tensor(idx)] if isinstance(x, torch.Tensor) else x[idx]
