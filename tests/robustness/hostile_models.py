"""Models that misbehave on purpose, importable as `hostile_models:NAME` (pytest puts this folder on sys.path;
subprocesses get it through PYTHONPATH)."""
from __future__ import annotations

import torch
from torch import nn

OVERFLOW_INPUT = 50.0  # every input feature is about this value (see ``overflow_inputs``)


class OverflowAtInt4(nn.Module):
    """``exp`` after ``fc1``: finite in FP32 (exp(40)), infinite once fc1's weights go to INT4.

    Each group of 32 input weights holds 0, 1 and thirty 0.11; asymmetric uint4 (scale 1/15) rounds
    0.11 up to 2/15, which adds about 1.4 x 50 = 70 to the pre-activation: exp(110) overflows float32
    and the next layer turns inf - inf into NaN. INT8 (scale 1/127) moves it by less than 1.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, 4)
        self.out = nn.Linear(4, 10)
        with torch.no_grad():
            group = torch.full((32,), 0.11)
            group[0], group[1] = 0.0, 1.0
            self.fc1.weight.copy_(group.repeat(2).expand(4, 64))
            self.fc1.bias.fill_(40.0 - float(self.fc1.weight[0].sum()) * OVERFLOW_INPUT)
            self.out.weight.copy_(torch.linspace(-1e-16, 1e-16, 40).reshape(10, 4))
            self.out.bias.zero_()

    def forward(self, x):
        return self.out(torch.exp(self.fc1(x.reshape(x.shape[0], -1))))


def overflow_at_int4() -> nn.Module:
    return OverflowAtInt4()


def overflow_inputs(n: int = 48, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (OVERFLOW_INPUT + rng.uniform(-0.05, 0.05, size=(n, 64))).astype(np.float32)


class AllWrong(nn.Module):
    """A classifier that always answers class 9 while every label is below 9: FP32 accuracy is exactly 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, 32)
        self.out = nn.Linear(32, 10)
        with torch.no_grad():
            self.out.bias.copy_(torch.tensor([0.0] * 9 + [100.0]))

    def forward(self, x):
        return self.out(torch.relu(self.fc1(x.reshape(x.shape[0], -1))))


def all_wrong() -> nn.Module:
    return AllWrong()


class NanInFp32(nn.Module):
    """The FP32 model itself outputs NaN for inputs above 1 (a log of a negative number)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, 10)

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.fc1(x) + torch.log(1.0 - x[:, :1])


def nan_in_fp32() -> nn.Module:
    return NanInFp32()
