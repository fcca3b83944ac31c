"""What a Hugging Face model folder says about itself: its head, its tokenizer, its padding token.

Shared by the text tasks (which tokenize with the model's tokenizer and pick a metric for its
head) and the model loader (``analysis.models.hf``, which masks the same padding token). Only
files are read here; nothing is downloaded and no code from the folder runs.
"""
from __future__ import annotations

import json
from pathlib import Path

from analysis.errors import InputError

# what the model's output is, from the end of its class name in config.json "architectures"
HEADS = {"ForSequenceClassification": "classification", "ForCausalLM": "causal", "LMHeadModel": "causal",
         "Model": "embedding", "ForMaskedLM": "embedding", "ForPreTraining": "embedding"}


def is_hf_folder(path: str | Path) -> bool:
    """A folder holding ``config.json``."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def read_json(path: Path, error=InputError) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not readable JSON ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object")
    return d


def architecture(folder: str | Path, error=InputError) -> tuple[str, str]:
    """``(class name, head)`` from ``config.json``: head is embedding | classification | causal.

    A sentence-transformers folder (``modules.json``) is an embedding model whatever its class.
    """
    folder = Path(folder)
    cfg = read_json(folder / "config.json", error)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs and isinstance(archs[0], str) else ""
    if (folder / "modules.json").is_file():
        return arch or "AutoModel", "embedding"
    if not arch:
        return "AutoModel", "embedding"  # no head recorded: a bare encoder
    for suffix, head in HEADS.items():
        if arch.endswith(suffix):
            return arch, head
    raise error(f"{folder / 'config.json'}: field 'architectures' is {arch}; supported heads: "
                f"{', '.join('*' + s for s in HEADS)}")


def _token_content(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def special_token(folder: Path, key: str) -> str | None:
    """A special token's text (``pad_token``, ``eos_token``) from tokenizer_config.json or special_tokens_map.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.is_file():
            tok = _token_content(read_json(f).get(key))
            if tok:
                return tok
    return None


def load_tokenizer(folder: str | Path, error=InputError):
    """The folder's tokenizer as a ``tokenizers.Tokenizer`` (from tokenizer.json: fast, no transformers
    import), else transformers' ``AutoTokenizer`` (local files only, no remote code)."""
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".json":
        folder, file = folder.parent, folder
    else:
        file = folder / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise error(f"{file}: not a readable tokenizer ({str(e).splitlines()[0][:160]})") from None
        tok.no_padding()
        tok.no_truncation()
        return tok
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # missing vocabulary files, unknown tokenizer classes
        raise error(f"{folder}: no tokenizer.json and transformers cannot load its tokenizer "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def token_id(tok, text: str) -> int | None:
    """The id of a special token in either kind of tokenizer."""
    if hasattr(tok, "token_to_id"):
        return tok.token_to_id(text)
    i = tok.convert_tokens_to_ids(text)
    return i if isinstance(i, int) else None


def pad_token_id(folder: str | Path, tok=None, error=InputError) -> int:
    """The id text is right-padded with: the tokenizer's pad token, else config.json's ``pad_token_id``,
    else the end-of-sequence token (causal LMs often ship without a pad token)."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    tok = tok if tok is not None else load_tokenizer(folder, error)
    pad = special_token(folder, "pad_token")
    if pad is None and hasattr(tok, "pad_token") and tok.pad_token:
        pad = tok.pad_token
    if pad is not None and (i := token_id(tok, pad)) is not None:
        return int(i)
    cfg = read_json(folder / "config.json", error) if (folder / "config.json").is_file() else {}
    if isinstance(cfg.get("pad_token_id"), int):
        return cfg["pad_token_id"]
    eos = special_token(folder, "eos_token")
    if eos is not None and (i := token_id(tok, eos)) is not None:
        return int(i)
    if isinstance(cfg.get("eos_token_id"), int):
        return cfg["eos_token_id"]
    raise error(f"{folder}: no padding token (pad_token in tokenizer_config.json, pad_token_id or eos_token_id "
                f"in config.json)")
