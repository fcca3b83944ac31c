"""Metrics: how a quantized model's outputs are scored against the FP32 model's (and labels).

A metric is accumulated batch by batch from the model's outputs, the FP32 reference
outputs of the same batch, and the labels (when there are any). Each metric carries a
continuous loss beside it, because accuracy on a few hundred samples moves in steps.
A metric may also need the whole evaluation set at once (nearest-neighbour retrieval
among all embeddings): its state keeps the outputs and adds set-level values at ``result()``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from analysis.errors import InputError


class MetricError(InputError):
    """A metric that cannot be used; the message names it."""


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
        raise MetricError(f"unknown metric '{name}'; known: {', '.join(sorted(METRICS))}") from None
