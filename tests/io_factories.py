"""Torch models whose inputs and outputs are not one tensor in, one (N, ...) tensor out; importable as
``io_factories:NAME`` (conftest puts tests/ on sys.path)."""
from __future__ import annotations

import torch
from torch import nn


class TwoInputs(nn.Module):
    """forward(a, b): two feature vectors, mixed after their own projections."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pa = nn.Linear(16, 32)
        self.pb = nn.Linear(8, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, a, b):
        return self.head(torch.relu(self.pa(a) + self.pb(b)))


def two_inputs() -> nn.Module:
    return TwoInputs()


class TupleOut(nn.Module):
    """Returns (logits, embedding): two outputs of very different scales."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(16, 32)
        self.cls = nn.Linear(32, 4)
        self.emb = nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.cls(h) * 100.0, self.emb(h)


def tuple_out() -> nn.Module:
    return TupleOut()


class DictOut(TupleOut):
    """Returns {"logits": ..., "embedding": ..., "loss": scalar}: the scalar has no batch axis."""

    def forward(self, x):
        logits, emb = super().forward(x)
        return {"logits": logits, "embedding": emb, "loss": logits.mean()}


def dict_out() -> nn.Module:
    return DictOut()


class TimeMajor(nn.Module):
    """A recogniser-shaped output: (T, N, C), the batch on axis 1; only later steps use ``late``."""

    def __init__(self, steps: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.steps = steps
        self.early = nn.Linear(16, 10)
        self.late = nn.Linear(16, 10 * (steps - 1))

    def forward(self, x):
        first = self.early(x).unsqueeze(1)  # (N, 1, C)
        rest = self.late(x).unflatten(1, (self.steps - 1, 10))  # (N, T-1, C)
        return torch.cat([first, rest], dim=1).transpose(0, 1)  # (T, N, C)


def time_major() -> nn.Module:
    return TimeMajor()
