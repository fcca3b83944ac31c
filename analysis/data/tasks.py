"""Tasks: calibration data, evaluation data and the name of a metric (``analysis.data.metrics``)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analysis.data.metrics import METRICS, Metric, MetricState, get_metric  # noqa: F401 - re-exported
from analysis.errors import InputError


class TaskError(InputError):
    """Bad task input; the message names the file or field."""


@dataclass
class Task:
    """Data and metric of one analysis. Inputs are arrays with the batch first: float32,
    or int64 token ids right-padded with ``pad_id``."""

    name: str
    source: str
    calib_inputs: np.ndarray
    eval_inputs: np.ndarray
    eval_labels: np.ndarray | None
    metric: str | None = None  # None: chosen from the model's output once it is known
    batch_size: int = 128
    pad_id: int | None = None  # token ids: each batch is cut to its longest sequence

    def _trim(self, x: np.ndarray) -> np.ndarray:
        """Drop the padding columns every sequence of the batch has (a masked model's output is unchanged)."""
        if self.pad_id is None or x.ndim != 2:
            return x
        used = (x != self.pad_id).any(0).nonzero()[0]
        return x[:, :used[-1] + 1] if len(used) else x[:, :1]

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for a in (self.calib_inputs, self.eval_inputs, self.eval_labels):
            if a is not None:
                h.update(str(a.dtype).encode() + str(a.shape).encode())
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def resolve_metric(self, output_shape: tuple[int, ...]) -> Metric:
        """The named metric, or the default for this output: accuracy with labels, else
        top-1 agreement for classifier-shaped (N, C) outputs, else cosine similarity."""
        if self.metric is None:
            if self.eval_labels is not None:
                name = "accuracy"
            else:
                name = "agreement" if len(output_shape) == 2 and output_shape[1] > 1 else "cosine"
        else:
            name = self.metric
        m = get_metric(name)
        if m.needs_labels and self.eval_labels is None:
            raise TaskError(f"metric '{name}' needs labels, but the task '{self.name}' has none")
        if name in ("accuracy", "agreement") and (len(output_shape) < 2 or output_shape[-1] < 2):
            raise TaskError(f"metric '{name}' needs class scores (N, C); the model outputs shape {tuple(output_shape)}")
        return m

    def eval_batches(self):
        """(inputs, labels or None) as torch tensors, in fixed order."""
        for s in range(0, len(self.eval_inputs), self.batch_size):
            x = torch.from_numpy(self._trim(self.eval_inputs[s:s + self.batch_size]))
            y = None if self.eval_labels is None else torch.from_numpy(self.eval_labels[s:s + self.batch_size])
            yield x, y

    def calib_batches(self):
        for s in range(0, len(self.calib_inputs), self.batch_size):
            yield torch.from_numpy(self._trim(self.calib_inputs[s:s + self.batch_size]))


def digits_task() -> Task:
    from analysis.data.demos import digits_arrays

    d = digits_arrays()
    return Task("digits", "scikit-learn load_digits (UCI optical digits), fixed splits seed 0",
                d["calib_inputs"], d["eval_inputs"], d["eval_labels"], metric="accuracy")


def minilm_task() -> Task:
    from analysis.data.minilm import MINILM_SPLITS, PAD_ID, minilm_arrays

    d = minilm_arrays()
    return Task("minilm", f"Python Language Reference paragraphs (pydoc_data.topics, PSF licence), "
                f"{MINILM_SPLITS['calib']} calibration + {MINILM_SPLITS['eval']} evaluation snippets "
                f"of <= 128 tokens; datasets/minilm/README.md",
                d["calib_inputs"], d["eval_inputs"], None, metric="embedding", batch_size=32, pad_id=PAD_ID)


BUNDLED_TASKS = {"digits": digits_task, "minilm": minilm_task}


def _check_finite(a: np.ndarray, where: str) -> None:
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise TaskError(f"{where}: {bad} value(s) are NaN or Inf")


def npz_task(path: str | Path, *, metric: str | None = None, calib: int | None = None, seed: int = 0) -> Task:
    """A task from an ``.npz`` with ``inputs`` (and optionally ``labels``, ``calib_inputs``).

    Without ``calib_inputs``, ``calib`` samples (default: a quarter, at most 128) are drawn
    with ``seed`` for calibration and the rest are evaluated.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        raise TaskError(f"{path}: refusing to load ({e}); save plain numeric arrays") from None
    except Exception as e:
        raise TaskError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    if "inputs" not in arrays:
        raise TaskError(f"{path}: field 'inputs' is missing (found: {', '.join(sorted(arrays)) or 'nothing'})")
    x = arrays["inputs"]
    if x.dtype.kind not in "fiub" or x.ndim < 1 or len(x) < 2:
        raise TaskError(f"{path}: field 'inputs' must be a numeric array with at least 2 samples")
    x = x.astype(np.float32) if x.dtype.kind == "f" else x
    if x.dtype.kind == "f":
        _check_finite(x, f"{path}: field 'inputs'")
    labels = arrays.get("labels")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.shape[:1] != x.shape[:1]:
            raise TaskError(f"{path}: field 'labels' must be integers, one per input ({len(x)})")
        labels = labels.astype(np.int64)
    if "calib_inputs" in arrays:
        c = arrays["calib_inputs"]
        if c.shape[1:] != x.shape[1:]:
            raise TaskError(f"{path}: field 'calib_inputs' has sample shape {c.shape[1:]}, 'inputs' has {x.shape[1:]}")
        c = c.astype(x.dtype)
        if c.dtype.kind == "f":
            _check_finite(c, f"{path}: field 'calib_inputs'")
        return Task(path.stem, str(path), c, x, labels, metric)
    n_calib = calib if calib is not None else max(1, min(128, len(x) // 4))
    if not 1 <= n_calib < len(x):
        raise TaskError(f"--calib {n_calib}: must be between 1 and {len(x) - 1} for {len(x)} samples")
    order = np.random.default_rng(seed).permutation(len(x))
    ci, ei = np.sort(order[:n_calib]), np.sort(order[n_calib:])
    return Task(path.stem, str(path), x[ci], x[ei], None if labels is None else labels[ei], metric)


def load_task(spec: str, *, metric: str | None = None, calib: int | None = None, seed: int = 0) -> Task:
    """A bundled task by name, or an ``.npz`` file."""
    if spec in BUNDLED_TASKS:
        task = BUNDLED_TASKS[spec]()
        if metric:
            task.metric = metric
        if calib is not None:
            if not 1 <= calib <= len(task.calib_inputs):
                raise TaskError(f"--calib {calib}: the '{spec}' task has {len(task.calib_inputs)} calibration samples")
            task.calib_inputs = task.calib_inputs[:calib]
        return task
    if spec.endswith(".npz") or Path(spec).suffix == ".npz":
        return npz_task(spec, metric=metric, calib=calib, seed=seed)
    raise TaskError(f"unknown task '{spec}'; known: {', '.join(sorted(BUNDLED_TASKS))}, or an .npz file")
