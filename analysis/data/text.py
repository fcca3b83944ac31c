"""Text tasks: a ``.txt`` (one text a line), ``.jsonl`` (a text field, an optional label field) or
``.csv`` (a text column, an optional label column), tokenized with the model's own tokenizer.

Token ids are int64 ``(N, L)``, truncated to ``max_length`` and right-padded with the tokenizer's
padding token to the longest text; each batch is cut to its own longest text (``Task.pad_id``).
What is measured follows the model folder's head (``analysis.data.hf_folder.architecture``):

* sentence embeddings / plain encoders: metric ``embedding``; labels are not read;
* sequence classification: ``accuracy`` against the labels, ``agreement`` with FP32 without them;
* causal LMs: ``perplexity`` on the text itself; the labels are the ids, padding marked ``-100``.

Labels: integers are class ids as given; strings are mapped through the model's ``label2id``
(config.json) when it names them all, else to ids in sorted order.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from analysis.data.hf_folder import architecture, is_hf_folder, load_tokenizer, pad_token_id, read_json
from analysis.data.options import Options, split_calib_eval
from analysis.data.tasks import Task, TaskError

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv")
OPTIONS = ("text_column", "label_column", "max_length", "tokenizer", "calib", "batch_size")
DEFAULT_MAX_LENGTH = 128  # tokens; attention cost grows with the square of it, on every job of the sweep
IGNORE_INDEX = -100  # label of a padding position (PyTorch's cross_entropy default)
HEAD_METRIC = {"embedding": "embedding", "classification": None, "causal": "perplexity"}
HEAD_BATCH = {"embedding": 32, "classification": 32, "causal": 8}  # causal logits are (N, L, vocabulary)


def _read_txt(path: Path) -> tuple[list[str], None]:
    texts = [line.strip() for line in _lines(path)]
    return [t for t in texts if t], None


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _column_values(rows: list[tuple[str, dict]], path: Path, column: str, required: bool, kind: str):
    """The ``column`` of every row, or None when it is optional and no row has it."""
    have = [column in r for _, r in rows]
    if not any(have) and not required:
        return None
    for (where, r), ok in zip(rows, have):
        if not ok or r[column] is None or r[column] == "":
            found = ", ".join(sorted(r)) or "nothing"
            raise TaskError(f"{path}: {where}: {kind} '{column}' is missing (found: {found})")
    return [r[column] for _, r in rows]


def _read_jsonl(path: Path, text_col: str, label_col: str, label_required: bool):
    rows = []
    for i, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}: line {i}: not JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise TaskError(f"{path}: line {i}: expected a JSON object")
        rows.append((f"line {i}", r))
    texts = _column_values(rows, path, text_col, True, "field")
    if any(not isinstance(t, str) for t in texts):
        i = next(k for k, t in enumerate(texts) if not isinstance(t, str))
        raise TaskError(f"{path}: {rows[i][0]}: field '{text_col}' must be a string")
    return texts, _column_values(rows, path, label_col, label_required, "field")


def _read_csv(path: Path, text_col: str, label_col: str, label_required: bool):
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = [(f"row {i}", r) for i, r in enumerate(reader, start=2)]
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise TaskError(f"{path}: not readable CSV ({e})") from None
    for col, needed in ((text_col, True), (label_col, label_required)):
        if needed and col not in columns:
            raise TaskError(f"{path}: column '{col}' is missing (columns: {', '.join(columns) or 'none'})")
    labels = _column_values(rows, path, label_col, label_required, "column") if label_col in columns else None
    return _column_values(rows, path, text_col, True, "column"), labels


def label_ids(raw: list, path: Path, column: str, label2id: dict | None = None) -> np.ndarray:
    """Class ids for raw labels: integers as given; strings through ``label2id`` when it names them
    all, else in sorted order."""
    def as_int(v):
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        return None

    ints = [as_int(v) for v in raw]
    if all(i is not None for i in ints):
        if min(ints) < 0:
            raise TaskError(f"{path}: '{column}' holds a negative class id ({min(ints)})")
        return np.asarray(ints, dtype=np.int64)
    names = [str(v) for v in raw]
    if label2id and all(n in label2id for n in names):
        return np.asarray([int(label2id[n]) for n in names], dtype=np.int64)
    order = {n: i for i, n in enumerate(sorted(set(names)))}
    return np.asarray([order[n] for n in names], dtype=np.int64)


def _tokenizer_folder(model: str | None, opts: Options, path: Path) -> Path:
    if opts.str("tokenizer"):
        p = Path(opts.str("tokenizer"))
        if not p.exists():
            raise TaskError(f"--task-option tokenizer={p}: no such file or folder")
        return p
    if model == "demo:minilm":
        from analysis.data.minilm import model_dir

        return model_dir()
    if model and is_hf_folder(model):
        return Path(model)
    raise TaskError(f"{path}: a text task needs a tokenizer: pass a Hugging Face model folder as MODEL, "
                    f"or --task-option tokenizer=FOLDER (or tokenizer.json)")


def _model_folder(model: str | None) -> Path | None:
    if model == "demo:minilm":
        from analysis.data.minilm import model_dir

        return model_dir()
    return Path(model) if model and is_hf_folder(model) else None


def _default_max_length(tok_folder: Path, model_folder: Path | None) -> int:
    """128, or less where the tokenizer or the model's position table is shorter."""
    limits = [DEFAULT_MAX_LENGTH]
    folder = tok_folder.parent if tok_folder.is_file() else tok_folder
    if (folder / "tokenizer_config.json").is_file():
        limits.append(read_json(folder / "tokenizer_config.json", TaskError).get("model_max_length"))
    if model_folder is not None:
        limits.append(read_json(model_folder / "config.json", TaskError).get("max_position_embeddings"))
    return min(v for v in limits if isinstance(v, int) and v > 0)


def encode(tok, texts: list[str], max_length: int, pad_id: int) -> np.ndarray:
    """int64 ids ``(N, L)``: each text truncated to ``max_length`` tokens, right-padded with ``pad_id``
    to the longest."""
    if hasattr(tok, "encode_batch"):  # tokenizers.Tokenizer
        tok.enable_truncation(max_length)
        seqs = [e.ids for e in tok.encode_batch(list(texts))]
    else:  # a transformers tokenizer
        seqs = tok(list(texts), truncation=True, max_length=max_length)["input_ids"]
    out = np.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def text_task(path: str | Path, *, model: str | None = None, options: dict | None = None, metric: str | None = None,
              calib: int | None = None, seed: int = 0) -> Task:
    """A task from a ``.txt``, ``.jsonl`` or ``.csv`` file (see the module docstring).

    Args:
        model: the MODEL argument: a Hugging Face folder (its tokenizer and head decide), ``demo:minilm``,
            or any other model with ``--task-option tokenizer=...``.
        options: text_column (default ``text``), label_column (default ``label``; required when given),
            max_length (default 128 or the model's limit), tokenizer, calib, batch_size.
        calib: calibration samples drawn with ``seed`` (default a quarter, at most 128); the rest is
            evaluated, sorted by length so batches carry little padding.

    Raises:
        TaskError: a missing file, field or column, an unknown option, or no tokenizer; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: no such file")
    suffix = path.suffix.lower()
    opts = Options(options, str(path), OPTIONS)
    if suffix == ".txt" and ({"text_column", "label_column"} & set(opts.values)):
        key = sorted({"text_column", "label_column"} & set(opts.values))[0]
        raise TaskError(f"--task-option {key}: {path} is plain text, one sample a line, without columns")
    model_folder = _model_folder(model)
    arch, head = architecture(model_folder, TaskError) if model_folder is not None else ("", "")
    text_col, label_col = opts.str("text_column", "text"), opts.str("label_column", "label")
    label_required = "label_column" in opts.values
    if suffix == ".txt":
        texts, raw_labels = _read_txt(path)
    elif suffix == ".jsonl":
        texts, raw_labels = _read_jsonl(path, text_col, label_col, label_required)
    elif suffix == ".csv":
        texts, raw_labels = _read_csv(path, text_col, label_col, label_required)
    else:
        raise TaskError(f"{path}: not a text task file (expected {', '.join(TEXT_SUFFIXES)})")
    if len(texts) < 2:
        raise TaskError(f"{path}: holds {len(texts)} text(s); a task needs at least 2")
    if label_required and head in ("embedding", "causal"):
        raise TaskError(f"--task-option label_column: the model ({arch}) is scored without labels "
                        f"({HEAD_METRIC[head]})")

    tok_folder = _tokenizer_folder(model, opts, path)
    tok = load_tokenizer(tok_folder, TaskError)
    pad_id = pad_token_id(tok_folder, tok, TaskError)
    max_length = opts.int("max_length", None) or _default_max_length(tok_folder, model_folder)
    ids = encode(tok, texts, max_length, pad_id)

    labels = None
    if head == "causal":
        labels = np.where(ids == pad_id, IGNORE_INDEX, ids)
    elif raw_labels is not None and head != "embedding":
        label2id = read_json(model_folder / "config.json", TaskError).get("label2id") if model_folder else None
        labels = label_ids(raw_labels, path, label_col, label2id if isinstance(label2id, dict) else None)

    ci, ei = split_calib_eval(len(ids), opts.calib(calib), seed)
    ei = ei[np.argsort((ids[ei] != pad_id).sum(1), kind="stable")]
    batch = opts.int("batch_size", HEAD_BATCH.get(head, 32))
    return Task(path.stem, str(path), ids[ci], ids[ei], None if labels is None else labels[ei],
                metric=metric or HEAD_METRIC.get(head), batch_size=batch, pad_id=pad_id)
