"""Tasks: calibration data, evaluation data and a metric with its direction.

A metric is accumulated batch by batch from the model's outputs, the FP32 reference
outputs of the same batch, and the labels (when there are any). Each metric carries a
continuous loss beside it, because accuracy on a few hundred samples moves in steps.
A metric may also need the whole evaluation set at once (nearest-neighbour retrieval
among all embeddings): its state keeps the outputs and adds set-level values at ``result()``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from analysis.errors import InputError


class TaskError(InputError):
    """Bad task input; the message names the file or field."""


def _flat(y: torch.Tensor) -> torch.Tensor:
    return y.reshape(y.shape[0], -1).double()


def _kl_to_reference(y: torch.Tensor, y_ref: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(softmax(y_ref) || softmax(y)) over the last dimension."""
    log_p = F.log_softmax(y_ref.double(), dim=-1)
    log_q = F.log_softmax(y.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).reshape(y.shape[0], -1).mean(dim=1)


@dataclass
class MetricState:
    """Running sums for one evaluation; ``result()`` gives metric, loss and KL (plus a
    set-level metric's own values, e.g. ``retrieval_agreement``)."""

    metric_name: str
    n: int = 0
    sums: dict = field(default_factory=lambda: {"metric": 0.0, "loss": 0.0, "kl": 0.0})
    outputs: list = field(default_factory=list)  # (y, y_ref) per batch, for set-level metrics only

    def update(self, y: torch.Tensor, y_ref: torch.Tensor, labels: torch.Tensor | None) -> None:
        m = METRICS[self.metric_name]
        metric, loss, kl = m.per_sample(y, y_ref, labels)
        self.n += y.shape[0]
        self.sums["metric"] += float(metric.sum())
        self.sums["loss"] += float(loss.sum())
        self.sums["kl"] += float(kl.sum()) if kl is not None else float("nan")
        if m.name in _SET_LEVEL:
            self.outputs.append((_flat(y).float(), _flat(y_ref).float()))

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        out = {k: v / n for k, v in self.sums.items()}
        if self.metric_name in _SET_LEVEL and self.outputs:
            y = torch.cat([a for a, _ in self.outputs])
            y_ref = torch.cat([b for _, b in self.outputs])
            out.update(_SET_LEVEL[self.metric_name](y, y_ref))
        return out


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    loss: str
    needs_labels: bool
    description: str

    def per_sample(self, y, y_ref, labels):
        return _PER_SAMPLE[self.name](y, y_ref, labels)


def _accuracy(y, y_ref, labels):
    return (y.argmax(-1) == labels).double(), F.cross_entropy(y.double(), labels, reduction="none"), _kl_to_reference(y, y_ref)


def _agreement(y, y_ref, labels):
    kl = _kl_to_reference(y, y_ref)
    return (y.argmax(-1) == y_ref.argmax(-1)).double().reshape(y.shape[0], -1).mean(1), kl, kl


def _cosine(y, y_ref, labels):
    a, b = _flat(y), _flat(y_ref)
    cos = F.cosine_similarity(a, b, dim=1, eps=1e-12)
    nmse = ((a - b) ** 2).sum(1) / (b**2).sum(1).clamp_min(1e-30)
    return cos, nmse, None


RETRIEVAL_TEMPERATURE = 0.05  # all-MiniLM-L6-v2 was trained with similarity scale 20


def _retrieval(y: torch.Tensor, y_ref: torch.Tensor) -> dict[str, float]:
    """Nearest-neighbour retrieval over the whole evaluation set, compared with FP32.

    Each text queries all the others by cosine similarity. ``retrieval_agreement`` is the
    fraction whose nearest neighbour is the same as under FP32; ``kl`` (its continuous
    loss) is the mean KL(FP32 || quantized) of the neighbour distributions
    softmax(similarity / 0.05), self excluded.
    """
    if len(y) < 3:
        return {"retrieval_agreement": float("nan")}
    a, b = F.normalize(y.double(), dim=1), F.normalize(y_ref.double(), dim=1)
    eye = torch.eye(len(a), dtype=torch.bool)
    s, s_ref = (a @ a.T).masked_fill(eye, -torch.inf), (b @ b.T).masked_fill(eye, -torch.inf)
    agree = (s.argmax(1) == s_ref.argmax(1)).double().mean()
    log_q = F.log_softmax(s / RETRIEVAL_TEMPERATURE, dim=1).masked_fill(eye, 0.0)
    log_p = F.log_softmax(s_ref / RETRIEVAL_TEMPERATURE, dim=1).masked_fill(eye, 0.0)
    kl = (log_p.exp() * (log_p - log_q)).sum(1).mean()
    return {"kl": float(kl), "retrieval_agreement": float(agree)}


def _embedding(y, y_ref, labels):
    cos, nmse, _ = _cosine(y, y_ref, labels)
    return cos, nmse, None  # kl comes from the whole set (``_retrieval``)


_PER_SAMPLE = {"accuracy": _accuracy, "agreement": _agreement, "cosine": _cosine, "embedding": _embedding}
_SET_LEVEL = {"embedding": _retrieval}

METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", True, "cross_entropy", True, "top-1 accuracy against the labels"),
    "agreement": Metric("agreement", True, "kl_to_fp32", False, "top-1 agreement with the FP32 model"),
    "cosine": Metric("cosine", True, "nmse_to_fp32", False, "mean cosine similarity of outputs to the FP32 model"),
    "embedding": Metric("embedding", True, "nmse_to_fp32", False,
                        "mean cosine similarity of embeddings to FP32; beside it nearest-neighbour retrieval "
                        "agreement with FP32 over the evaluation set (retrieval_agreement) and the KL of "
                        "neighbour distributions softmax(similarity/0.05) (kl)"),
}


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise TaskError(f"unknown metric '{name}'; known: {', '.join(sorted(METRICS))}") from None


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
