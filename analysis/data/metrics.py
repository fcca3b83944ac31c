"""Metrics: how a quantized model's outputs are scored against the FP32 model's (and labels).

A metric is accumulated batch by batch from the model's outputs, the FP32 reference
outputs of the same batch, and the labels (when there are any). Each metric carries a
continuous loss beside it, because accuracy on a few hundred samples moves in steps.
A metric may also need the whole evaluation set at once (nearest-neighbour retrieval
among all embeddings): its state keeps the outputs and adds set-level values at ``result()``.

Built-in metrics: ``accuracy`` (labels), ``agreement`` (top-1 with FP32), ``cosine``,
``embedding`` and ``nmse`` (normalised squared error to FP32, lower is better). A user metric
is named ``package.module:function`` (see :func:`user_metric`).

Choosing one (:func:`choose_metric`) tells apart two ways a metric can fail on a model's output:

* **degenerate**: it cannot move whatever quantization does, so every layer would look harmless.
  Cosine similarity of outputs that hold one value per sample (a scalar, or one value repeated)
  is ±1 by its sign alone; top-1 agreement or accuracy over class scores that are all tied is
  decided by tie-breaking; a normalised error to an FP32 output that is all zero is undefined.
  Degenerate metrics are refused, named or not.
* **uninformative**: it can move but tests little. Top-1 agreement where the FP32 model picks the
  same class for every evaluated sample tests that one decision boundary only. The automatic choice
  avoids it (and says why); a metric named explicitly is honoured.

The tests look at the FP32 output of the first evaluation batch, which is all that is known
before the sweep starts.
"""
from __future__ import annotations

import importlib
import inspect
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from analysis.errors import InputError


class MetricError(InputError):
    """A metric that cannot be used; the message names it."""


# (y, y_ref, labels) -> per-sample (metric, loss, KL or None), each of shape (N,)
PerSample = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"],
                     "tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]"]


def _flat(y: torch.Tensor) -> torch.Tensor:
    return y.reshape(y.shape[0], -1).double()


def _kl_to_reference(y: torch.Tensor, y_ref: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(softmax(y_ref) || softmax(y)) over the last dimension."""
    log_p = F.log_softmax(y_ref.double(), dim=-1)
    log_q = F.log_softmax(y.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).reshape(y.shape[0], -1).mean(dim=1)


def nmse_per_sample(y: torch.Tensor, y_ref: torch.Tensor) -> torch.Tensor:
    """``||y - y_ref||^2 / ||y_ref||^2`` per sample, over all of its output elements."""
    a, b = _flat(y), _flat(y_ref)
    return ((a - b) ** 2).sum(1) / (b**2).sum(1).clamp_min(1e-30)


@dataclass(frozen=True)
class Metric:
    """A metric, its direction and the continuous loss measured beside it."""

    name: str
    higher_is_better: bool
    loss: str
    needs_labels: bool
    description: str
    score: PerSample = field(compare=False, repr=False)
    user: bool = False  # package.module:function: no checks of the output's shape apply

    def per_sample(self, y, y_ref, labels):
        return self.score(y, y_ref, labels)


@dataclass
class MetricState:
    """Running sums for one evaluation; ``result()`` gives metric, loss and KL (plus a
    set-level metric's own values, e.g. ``retrieval_agreement``)."""

    metric_name: str
    n: int = 0
    sums: dict = field(default_factory=lambda: {"metric": 0.0, "loss": 0.0, "kl": 0.0})
    outputs: list = field(default_factory=list)  # (y, y_ref) per batch, for set-level metrics only
    metric: Metric = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.metric = get_metric(self.metric_name)

    def update(self, y: torch.Tensor, y_ref: torch.Tensor, labels: torch.Tensor | None) -> None:
        metric, loss, kl = self.metric.per_sample(y, y_ref, labels)
        self.n += y.shape[0]
        self.sums["metric"] += float(metric.sum())
        self.sums["loss"] += float(loss.sum())
        self.sums["kl"] += float(kl.sum()) if kl is not None else float("nan")
        if self.metric_name in _SET_LEVEL:
            self.outputs.append((_flat(y).float(), _flat(y_ref).float()))

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        out = {k: v / n for k, v in self.sums.items()}
        if self.metric_name in _SET_LEVEL and self.outputs:
            y = torch.cat([a for a, _ in self.outputs])
            y_ref = torch.cat([b for _, b in self.outputs])
            out.update(_SET_LEVEL[self.metric_name](y, y_ref))
        return out


def _accuracy(y, y_ref, labels):
    return (y.argmax(-1) == labels).double(), F.cross_entropy(y.double(), labels, reduction="none"), _kl_to_reference(y, y_ref)


def _agreement(y, y_ref, labels):
    kl = _kl_to_reference(y, y_ref)
    return (y.argmax(-1) == y_ref.argmax(-1)).double().reshape(y.shape[0], -1).mean(1), kl, kl


def _cosine(y, y_ref, labels):
    cos = F.cosine_similarity(_flat(y), _flat(y_ref), dim=1, eps=1e-12)
    return cos, nmse_per_sample(y, y_ref), None


def _nmse(y, y_ref, labels):
    e = nmse_per_sample(y, y_ref)
    return e, e, None


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


_SET_LEVEL = {"embedding": _retrieval}

METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", True, "cross_entropy", True, "top-1 accuracy against the labels", _accuracy),
    "agreement": Metric("agreement", True, "kl_to_fp32", False, "top-1 agreement with the FP32 model", _agreement),
    "cosine": Metric("cosine", True, "nmse_to_fp32", False, "mean cosine similarity of outputs to the FP32 model",
                     _cosine),
    "embedding": Metric("embedding", True, "nmse_to_fp32", False,
                        "mean cosine similarity of embeddings to FP32; beside it nearest-neighbour retrieval "
                        "agreement with FP32 over the evaluation set (retrieval_agreement) and the KL of "
                        "neighbour distributions softmax(similarity/0.05) (kl)", _embedding),
    "nmse": Metric("nmse", False, "nmse_to_fp32", False,
                   "mean normalised squared error to the FP32 model, ||y - y_fp32||^2 / ||y_fp32||^2 per sample "
                   "(lower is better)", _nmse),
}


# Causal language models: logits (N, L, V) on token ids whose labels are the ids themselves, padding
# marked -100 (``analysis.data.text``); a batch's inputs may be cut shorter than its labels.
def _masked_mean(v, mask):
    return (v * mask).sum(1) / mask.sum(1).clamp_min(1)


def _position_kl(y, y_ref):
    """KL(softmax(y_ref) || softmax(y)) at every position: (N, L)."""
    log_p, log_q = F.log_softmax(y_ref.double(), -1), F.log_softmax(y.double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _perplexity(y, y_ref, labels):
    """Per text: exp of the mean cross-entropy of each next real token (a one-token text scores 1)."""
    target = labels[:, 1:y.shape[1]]
    mask = target != -100
    ce = F.cross_entropy(y[:, :-1].double().transpose(1, 2), target.clamp_min(0), reduction="none")
    mean_ce = _masked_mean(ce, mask)
    return mean_ce.exp(), mean_ce, _masked_mean(_position_kl(y[:, :-1], y_ref[:, :-1]), mask)


def _next_token_agreement(y, y_ref, labels):
    mask = torch.ones(y.shape[:2], dtype=torch.bool) if labels is None else labels[:, :y.shape[1]] != -100
    kl = _masked_mean(_position_kl(y, y_ref), mask)
    return _masked_mean((y.argmax(-1) == y_ref.argmax(-1)).double(), mask), kl, kl


METRICS.update({
    "perplexity": Metric("perplexity", False, "cross_entropy", True,
                         "per-text perplexity of the next token (exp of its mean cross-entropy over the real "
                         "tokens; labels are the token ids), lower is better", _perplexity),
    "next_token_agreement": Metric("next_token_agreement", True, "kl_to_fp32", False,
                                   "share of real token positions whose most likely next token is the FP32 "
                                   "model's", _next_token_agreement),
})


def get_metric(name: str) -> Metric:
    """A built-in metric by name, or a user metric ``package.module:function``."""
    if name in METRICS:
        return METRICS[name]
    if ":" in name:
        return user_metric(name)
    raise MetricError(f"unknown metric '{name}'; known: {', '.join(sorted(METRICS))}, "
                      f"or package.module:function for your own")


# ---- user metrics ----------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def user_metric(spec: str) -> Metric:
    """The metric ``package.module:function``, imported with the working folder on ``sys.path``.

    The function is called per evaluation batch as ``fn(y_fp32, y_quant, labels_or_None)`` with torch
    tensors (outputs batch first) and returns per-sample scores (1-D, length N) or one number for the
    batch (weighted by N). Higher is better unless the function has ``higher_is_better = False``. The
    loss measured beside it is the normalised squared error to FP32 (``nmse``).

    Raises:
        MetricError: the module cannot be imported, has no such function, or its direction is not a bool.

    Example:
        >>> # mymetrics.py:  def mae(y_fp32, y_q, labels): return -(y_q - y_fp32).abs().flatten(1).mean(1)
        >>> get_metric("mymetrics:mae").higher_is_better
        True
    """
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name or ":" in fn_name:
        raise MetricError(f"metric '{spec}': expected package.module:function")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # metrics in the user's working folder, as for model factories
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise MetricError(f"metric '{spec}': cannot import module '{mod_name}' ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing: their error, one line
        raise MetricError(f"metric '{spec}': importing module '{mod_name}' raised "
                          f"{type(e).__name__}: {_first_line(e)}") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise MetricError(f"metric '{spec}': module '{mod_name}' has no function '{fn_name}'")
    if not callable(fn):
        raise MetricError(f"metric '{spec}': '{fn_name}' is a {type(fn).__name__}, not a function")
    hib = getattr(fn, "higher_is_better", True)
    if not isinstance(hib, (bool, np.bool_)):
        raise MetricError(f"metric '{spec}': attribute higher_is_better must be True or False, not {hib!r}")
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    description = f"user metric {spec}" + (f": {doc[0]}" if doc else "")
    return Metric(spec, bool(hib), "nmse_to_fp32", False, description, UserScore(spec, fn), user=True)


@dataclass(frozen=True)
class UserScore:
    """Calls a user metric on one batch; its errors and malformed results become one-line ``MetricError``s."""

    spec: str
    fn: Callable

    def __call__(self, y: torch.Tensor, y_ref: torch.Tensor, labels: torch.Tensor | None):
        n = y.shape[0]
        # copies: the FP32 reference of a batch is shared by every job measured on it
        args = (y_ref.detach().clone(), y.detach().clone(), None if labels is None else labels.clone())
        try:
            out = self.fn(*args)
        except Exception as e:  # noqa: BLE001 - whatever the user's function raises is reported, naming it
            raise MetricError(f"metric {self.spec} raised {type(e).__name__}: {_first_line(e)}") from None
        scores = self._scores(out, n)
        # NaN where the outputs themselves held NaN/Inf is the sweep's to record (a non-finite job); elsewhere a bug
        finite_in = torch.isfinite(_flat(y)).all(1) & torch.isfinite(_flat(y_ref)).all(1)
        bad = int((~torch.isfinite(scores) & finite_in).sum())
        if bad:
            raise MetricError(f"metric {self.spec} returned NaN or Inf for {bad} of {n} sample(s) with finite outputs")
        return scores, nmse_per_sample(y, y_ref), None

    def _scores(self, out, n: int) -> torch.Tensor:
        expected = f"expected one score per sample, shape ({n},), or one number for the batch"
        if isinstance(out, numbers.Real):
            return torch.full((n,), float(out), dtype=torch.float64)
        if isinstance(out, np.ndarray):
            if out.dtype.kind not in "biuf":
                raise MetricError(f"metric {self.spec} returned an array of {out.dtype}; {expected}")
            out = torch.from_numpy(np.ascontiguousarray(out))
        if not isinstance(out, torch.Tensor):
            raise MetricError(f"metric {self.spec} returned {type(out).__name__}; {expected}")
        if out.is_complex():
            raise MetricError(f"metric {self.spec} returned complex numbers; {expected}")
        out = out.detach().double()
        if out.ndim == 0:
            return out.expand(n).clone()
        if tuple(out.shape) != (n,):
            raise MetricError(f"metric {self.spec} returned shape {tuple(out.shape)}; {expected}")
        return out


# ---- choosing a metric for a model's output --------------------------------------------------

_LABELS = {"accuracy": "top-1 accuracy", "agreement": "top-1 agreement", "cosine": "cosine similarity",
           "embedding": "cosine similarity", "nmse": "the normalised squared error"}


def _check_usable(m: Metric, has_labels: bool, shape: tuple[int, ...]) -> None:
    if m.needs_labels and not has_labels:
        raise MetricError(f"metric '{m.name}' needs labels, but the task has none")
    if m.name in ("accuracy", "agreement") and (len(shape) < 2 or shape[-1] < 2):
        raise MetricError(f"metric '{m.name}' needs class scores (N, C); the model outputs shape {shape}")


def _degenerate(name: str, y: torch.Tensor) -> str | None:
    """Why ``name`` cannot move on outputs like ``y`` (FP32, batch first), or None."""
    shape = tuple(y.shape)
    flat = _flat(y)
    if name in ("cosine", "embedding"):
        if flat.shape[1] == 1:
            return (f"the output holds one value per sample (shape {shape}), and the cosine similarity of two "
                    f"numbers is ±1 by their signs alone")
        if bool((flat.amax(1) == flat.amin(1)).all()):
            return (f"every sample's output repeats one value over its {flat.shape[1]} elements (shape {shape}), "
                    f"so cosine similarity sees only its sign")
    if name in ("accuracy", "agreement"):
        scores = y.double()
        if bool((scores.amax(-1) == scores.amin(-1)).all()):
            return f"every sample's class scores are tied (shape {shape}), so the top class is decided by tie-breaking"
    if name == "nmse":
        zero = int((flat == 0).all(1).sum())
        if zero:
            return (f"the FP32 output is all zero for {zero} of the {flat.shape[0]} samples of the first evaluation "
                    f"batch, where an error relative to it is undefined")
    return None


def _uninformative(name: str, y: torch.Tensor) -> str | None:
    """Why ``name`` would test little on outputs like ``y`` (it can still move), or None."""
    if name == "agreement" and y.shape[0] > 1:
        top = y.argmax(-1).reshape(y.shape[0], -1)
        if bool((top == top[0]).all()):
            which = f"class {int(top[0, 0])}" if top.shape[1] == 1 else "the same classes"
            return (f"the FP32 model picks {which} for every one of the {y.shape[0]} samples of the first "
                    f"evaluation batch, so agreement would test that one decision only")
    return None


def choose_metric(name: str | None, has_labels: bool, y_fp32: torch.Tensor,
                  outputs: int = 1) -> tuple[Metric, str | None]:
    """The metric for a model whose FP32 output on the first evaluation batch is ``y_fp32`` (batch first).

    ``name`` None chooses: accuracy with labels, top-1 agreement for class scores (N, C>1), else cosine
    similarity; where that choice is degenerate or uninformative (module docstring), ``nmse`` instead.
    A named built-in metric is checked (labels, class scores, degenerate); a user metric is taken as is.
    ``outputs`` > 1: ``y_fp32`` is several model outputs side by side, which are no class scores: the
    choice is cosine (or nmse), and a class-score metric is refused with a pointer to ``--output``.

    Returns:
        The metric and, where the automatic choice avoided another, one sentence saying why.

    Raises:
        MetricError: the named metric is unknown, cannot be used on this output, or is degenerate on it;
            or nothing built in can move on it.

    Example:
        >>> m, why = choose_metric(None, False, torch.randn(8, 1))
        >>> m.name, why.startswith("cosine similarity cannot move")
        ('nmse', True)
    """
    shape = tuple(y_fp32.shape)
    if name is not None:
        m = get_metric(name)
        if m.user:
            return m, None
        if outputs > 1 and m.name in ("accuracy", "agreement", "next_token_agreement", "perplexity"):
            raise MetricError(f"metric '{name}' reads class scores, but {outputs} model outputs are compared "
                              f"together; name the one to score with --output NAME")
        _check_usable(m, has_labels, shape)
        if (why := _degenerate(m.name, y_fp32)) is not None:
            other = "nmse or " if m.name != "nmse" else ""
            raise MetricError(f"metric '{name}' cannot move on this model: {why}; choose {other}a metric of your "
                              f"own (--metric package.module:function)")
        return m, None
    auto = "accuracy" if has_labels else ("agreement" if len(shape) == 2 and shape[1] > 1 else "cosine")
    if outputs > 1:
        auto = "cosine"  # outputs side by side are not one set of class scores
    m = METRICS[auto]
    _check_usable(m, has_labels, shape)
    if (why := _degenerate(auto, y_fp32)) is not None:
        reason = f"{_LABELS[auto]} cannot move here: {why}"
    elif (why := _uninformative(auto, y_fp32)) is not None:
        reason = f"{_LABELS[auto]} would tell little here: {why}"
    else:
        return m, (f"{outputs} model outputs are compared together, which are not one set of class scores; "
                   f"--output NAME scores one of them" if outputs > 1 else None)
    if (why := _degenerate("nmse", y_fp32)) is not None:
        raise MetricError(f"no built-in metric fits this model's output: {reason}, and {why}; "
                          f"give one of your own (--metric package.module:function)")
    return METRICS["nmse"], reason
