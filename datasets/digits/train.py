"""Recipe for datasets/digits/digits_cnn.safetensors (deterministic on CPU, ~1 minute).

    .venv/bin/python datasets/digits/train.py

Data: scikit-learn's copy of the UCI optical recognition of handwritten digits test set
(1,797 8x8 images, BSD-3-Clause with scikit-learn, originally CC BY 4.0 from UCI).
Training uses only the ``train`` split of ``analysis.data.demos.digits_arrays``; the
``calib`` and ``eval`` splits are never seen during training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from analysis.data.demos import DIGITS_WEIGHTS, DigitsCNN, digits_arrays

SEED, EPOCHS, BATCH, LR = 0, 40, 64, 2e-3


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    data = digits_arrays()
    x, y = torch.from_numpy(data["train_inputs"]), torch.from_numpy(data["train_labels"])
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(EPOCHS):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(BATCH):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        for split in ("calib", "eval"):
            xs, ys = torch.from_numpy(data[f"{split}_inputs"]), torch.from_numpy(data[f"{split}_labels"])
            acc = (model(xs).argmax(1) == ys).float().mean().item()
            print(f"{split} accuracy: {acc:.4f} on {len(ys)} images")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(DIGITS_WEIGHTS))
    print(f"wrote {DIGITS_WEIGHTS}")


if __name__ == "__main__":
    main()
