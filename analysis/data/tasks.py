"""Tasks: calibration data, evaluation data and the name of a metric (``analysis.data.metrics``)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analysis.data.batch import Inputs, Samples, arrays_of, to_torch
from analysis.data.metrics import METRICS, Metric, MetricState, get_metric  # noqa: F401 - re-exported
from analysis.errors import InputError


class TaskError(InputError):
    """Bad task input; the message names the file or field."""


@dataclass
class Task:
    """Data and metric of one analysis. Inputs are arrays with the batch first (float32, or
    int64 token ids right-padded with ``pad_id``): one array for a model with one input, or an
    ``Inputs`` of named arrays for a model with several (``analysis.data.batch``)."""

    name: str
    source: str
    calib_inputs: Samples
    eval_inputs: Samples
    eval_labels: np.ndarray | None
    metric: str | None = None  # None: chosen from the model's output once it is known
    batch_size: int = 128
    pad_id: int | None = None  # token ids: each batch is cut to its longest sequence

    def _trim(self, x: Samples) -> Samples:
        """Drop the padding columns every sequence of the batch has (a masked model's output is unchanged).
        With several inputs, the first 2-D integer array decides, and every (N, L) array is cut alike."""
        if self.pad_id is None:
            return x
        arrays = arrays_of(x)
        ids = next((a for a in arrays.values() if a.ndim == 2 and a.dtype.kind in "iu"), None)
        if ids is None:
            return x
        used = (ids != self.pad_id).any(0).nonzero()[0]
        end = used[-1] + 1 if len(used) else 1
        cut = {k: a[:, :end] if a.ndim == 2 and a.shape == ids.shape else a for k, a in arrays.items()}
        return Inputs(cut) if isinstance(x, Inputs) else cut["inputs"]

    @property
    def sha256(self) -> str:
        """Content hash of the data (a task with one unnamed input hashes as it always has)."""
        h = hashlib.sha256()
        for part in (self.calib_inputs, self.eval_inputs, self.eval_labels):
            if part is None:
                continue
            named = isinstance(part, Inputs)
            for k, a in sorted(arrays_of(part).items()):
                h.update((f"{k}|" if named else "").encode() + str(a.dtype).encode() + str(a.shape).encode())
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def eval_batches(self):
        """(inputs, labels or None) as torch tensors, in fixed order."""
        for s in range(0, len(self.eval_inputs), self.batch_size):
            x = to_torch(self._trim(self.eval_inputs[s:s + self.batch_size]))
            y = None if self.eval_labels is None else torch.from_numpy(self.eval_labels[s:s + self.batch_size])
            yield x, y

    def calib_batches(self):
        for s in range(0, len(self.calib_inputs), self.batch_size):
            yield to_torch(self._trim(self.calib_inputs[s:s + self.batch_size]))


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


def _input_array(a: np.ndarray, where: str) -> np.ndarray:
    if a.dtype.kind not in "fiub" or a.ndim < 1:
        raise TaskError(f"{where} must be a numeric array with the samples first")
    a = a.astype(np.float32) if a.dtype.kind == "f" else a
    if a.dtype.kind == "f":
        _check_finite(a, where)
    return a


def npz_task(path: str | Path, *, metric: str | None = None, calib: int | None = None, seed: int = 0) -> Task:
    """A task from an ``.npz``: ``inputs`` for a model with one input, or one array per input name
    for a model with several (``input_ids``, ``attention_mask``, ...); optionally ``labels`` and
    calibration samples ``calib_<name>`` (``calib_inputs`` for the single input).

    Without calibration arrays, ``calib`` samples (default: a quarter, at most 128) are drawn
    with ``seed`` for calibration and the rest are evaluated.
    """
    path = Path(path)
    if path.is_dir():
        raise TaskError(f"{path}: a directory, not an .npz file")
    if not path.is_file():
        raise TaskError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        raise TaskError(f"{path}: refusing to load ({e}); save plain numeric arrays") from None
    except Exception as e:
        raise TaskError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
    names = [k for k in arrays if k != "labels" and not k.startswith("calib_")]
    if not names:
        raise TaskError(f"{path}: field 'inputs' is missing (found: {', '.join(sorted(arrays)) or 'nothing'})")
    xs = {k: _input_array(arrays[k], f"{path}: field '{k}'") for k in names}
    n = {len(v) for v in xs.values()}
    if len(n) > 1:
        raise TaskError(f"{path}: input fields have different numbers of samples: "
                        + ", ".join(f"'{k}' {len(v)}" for k, v in xs.items()))
    if n.pop() < 2:
        raise TaskError(f"{path}: field '{names[0]}' must hold at least 2 samples")
    single = names == ["inputs"]
    x = xs["inputs"] if single else Inputs(xs)
    labels = arrays.get("labels")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.shape[:1] != (len(x),):
            raise TaskError(f"{path}: field 'labels' must be integers, one per input ({len(x)})")
        labels = labels.astype(np.int64)
    calib_keys = [k for k in arrays if k.startswith("calib_")]
    if calib_keys:
        cs = {}
        for k in names:
            if f"calib_{k}" not in arrays:
                raise TaskError(f"{path}: field 'calib_{k}' is missing (calibration samples for input '{k}')")
            c = _input_array(arrays[f"calib_{k}"], f"{path}: field 'calib_{k}'")
            if c.shape[1:] != xs[k].shape[1:]:
                raise TaskError(f"{path}: field 'calib_{k}' has sample shape {c.shape[1:]}, '{k}' has {xs[k].shape[1:]}")
            cs[k] = c.astype(xs[k].dtype)
        extra = sorted(set(calib_keys) - {f"calib_{k}" for k in names})
        if extra:
            raise TaskError(f"{path}: field '{extra[0]}' matches no input field ({', '.join(names)})")
        try:
            c = cs["inputs"] if single else Inputs(cs)
        except InputError as e:
            raise TaskError(f"{path}: calibration fields: {e}") from None
        return Task(path.stem, str(path), c, x, labels, metric)
    n_calib = calib if calib is not None else max(1, min(128, len(x) // 4))
    if not 1 <= n_calib < len(x):
        raise TaskError(f"--calib {n_calib}: must be between 1 and {len(x) - 1} for {len(x)} samples")
    order = np.random.default_rng(seed).permutation(len(x))
    ci, ei = np.sort(order[:n_calib]), np.sort(order[n_calib:])
    return Task(path.stem, str(path), x[ci], x[ei], None if labels is None else labels[ei], metric)


def load_task(spec: str, *, metric: str | None = None, calib: int | None = None, seed: int = 0,
              model: str | None = None, options: dict | None = None) -> Task:
    """A bundled task by name, or a data file.

    Args:
        model: the MODEL argument, for tasks that need it (text is tokenized with the model's tokenizer).
        options: ``--task-option KEY=VALUE`` pairs of the task's kind (text columns, image sizes, ...).
    """
    options = dict(options or {})
    if spec in BUNDLED_TASKS or spec.endswith(".npz") or Path(spec).suffix == ".npz":
        if options:
            raise TaskError(f"--task-option {next(iter(options))}: the task '{spec}' takes no options")
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
    if Path(spec).suffix.lower() in (".txt", ".jsonl", ".csv"):
        from analysis.data.text import text_task

        return text_task(spec, model=model, options=options, metric=metric, calib=calib, seed=seed)
    if Path(spec).is_dir():  # a folder of class subfolders of images
        from analysis.data.images import image_folder_task

        return image_folder_task(spec, options=options, metric=metric, calib=calib, seed=seed)
    raise TaskError(f"unknown task '{spec}'; known: {', '.join(sorted(BUNDLED_TASKS))}, an .npz file, "
                    f"a .txt, .jsonl or .csv of texts, or a folder of class subfolders of images")
