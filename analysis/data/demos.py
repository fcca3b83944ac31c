"""The bundled demo models and their data: a small CNN trained on scikit-learn's digits.

The weights live in ``datasets/digits/`` with the recipe that made them
(``datasets/digits/train.py``); the data ships with scikit-learn.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

DATASETS = Path(__file__).resolve().parents[2] / "datasets"
DIGITS_DIR = DATASETS / "digits"
DIGITS_WEIGHTS = DIGITS_DIR / "digits_cnn.safetensors"
DIGITS_SPLIT_SEED = 0
DIGITS_SPLITS = {"train": 1097, "calib": 100, "eval": 600}


class DigitsCNN(nn.Module):
    """Four 3x3 convolutions (one residual block) and three Linear layers for 8x8 digits.

    ``conv1`` has K = 1*3*3 = 9 inputs per output, which no 4-bit group of 32 divides:
    it shows how a layer a format cannot take is reported as skipped.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(256, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        x = F.max_pool2d(F.relu(self.conv4(x) + x), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.head(x)


def digits_arrays() -> dict[str, np.ndarray]:
    """Fixed train / calibration / evaluation splits of scikit-learn's 1,797 digits.

    Returns float32 images of shape (N, 1, 8, 8) scaled to [0, 1] and int64 labels,
    keyed ``{split}_inputs`` / ``{split}_labels``.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y))
    out, start = {}, 0
    for split, n in DIGITS_SPLITS.items():
        idx = order[start:start + n]
        out[f"{split}_inputs"], out[f"{split}_labels"] = x[idx], y[idx]
        start += n
    return out


def digits_model() -> DigitsCNN:
    """The trained demo CNN (weights from ``datasets/digits/digits_cnn.safetensors``)."""
    from safetensors.torch import load_file

    model = DigitsCNN()
    model.load_state_dict(load_file(str(DIGITS_WEIGHTS)))
    return model.eval()
