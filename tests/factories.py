"""Small torch models for tests, importable as `factories:NAME` (conftest puts tests/ on sys.path)."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 64, classes: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(d_in, 64)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(64, 32)
        self.out = nn.Linear(32, classes)

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.out(self.act(self.fc2(self.act(self.fc1(x)))))


def tiny_mlp() -> nn.Module:
    return TinyMLP()


class Untraceable(TinyMLP):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        h = F.relu(self.fc1(x))
        if h.shape[0] > 0:  # bool() of a traced shape stops torch.fx
            h = F.relu(self.fc2(h))
        return self.out(h)


def untraceable() -> nn.Module:
    return Untraceable()


class InPlaceAfterUse(TinyMLP):
    """Traces, but mutates fc1's output after fc2 has read it: cached values go stale."""

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        h = self.fc1(x)
        g = self.fc2(h)
        h.mul_(0.5)  # a tensor method, not a module: no_inplace() cannot turn it off
        return self.out(F.relu(g + h[:, :32]))


def inplace_after_use() -> nn.Module:
    return InPlaceAfterUse()


class InPlaceAfterLast(TinyMLP):
    """After the last layer, scales fc2's activation in place and reads it again: ``out`` has read it
    already, so a recomputation that starts at ``out`` would see it stale (one starting at fc2 would not)."""

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        g = F.relu(self.fc2(F.relu(self.fc1(x))))
        y = self.out(g)
        g.mul_(0.5)
        return y + g[:, :10]


def inplace_after_last() -> nn.Module:
    return InPlaceAfterLast()


class InplaceResidual(nn.Module):
    """A ResNet-style block: ``out += identity`` where the identity branch holds a layer (``down``), then
    in-place ReLUs; nothing reads ``out`` as it was before the addition."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 32)
        self.down = nn.Linear(64, 32)
        self.relu = nn.ReLU(inplace=True)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        x = self.relu(self.fc1(x.reshape(x.shape[0], -1)))
        identity = self.down(x)
        out = self.fc2(x)
        out += identity
        out = F.relu(out, inplace=True)
        return self.out(out)


def inplace_residual() -> nn.Module:
    return InplaceResidual()


class DeadBranch(TinyMLP):
    """`unused` runs but its output never reaches the model's output."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(64, 32)

    def forward(self, x):
        x = x.reshape(x.shape[0], -1)
        h = F.relu(self.fc1(x))
        _ = self.unused(h)
        return self.out(F.relu(self.fc2(h)))


def dead_branch() -> nn.Module:
    return DeadBranch()


class NoLayers(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)[:, :10] * 2


def no_layers() -> nn.Module:
    return NoLayers()


def not_a_module():
    return {"weights": 1}


class Embedder(nn.Module):
    """Outputs a 16-dim embedding (not class scores): the default metric is cosine."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 16)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x.reshape(x.shape[0], -1))))


def embedder() -> nn.Module:
    return Embedder()


class ResidualMLP(nn.Module):
    """A deeper residual stack: enough jobs for a sweep that lasts a few seconds."""

    def __init__(self, width: int = 256, blocks: int = 12) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
                                    for _ in range(blocks))
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def residual_mlp() -> nn.Module:
    return ResidualMLP()


class CrashOnce(TinyMLP):
    """Kills the worker process it runs in, once (a flag file marks it done); the main process is spared."""

    def forward(self, x):
        import os

        flag = os.environ.get("QUANTLENS_TEST_CRASH_FLAG")
        main_pid = os.environ.get("QUANTLENS_TEST_MAIN_PID")
        if flag and main_pid and os.getpid() != int(main_pid) and not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(3)
        return super().forward(x)


def crash_once() -> nn.Module:
    return CrashOnce()
