"""Tiny but complete Hugging Face model folders, built offline: random weights saved with
``save_pretrained`` beside a word-level tokenizer (``tokenizers``) over the words of ``TEXTS``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TEXTS = [
    "A list keeps its items in the order they were added.",
    "Dictionaries map hashable keys to arbitrary values.",
    "The for statement iterates over the items of any sequence.",
    "Exceptions are raised when an error is detected at run time.",
    "A function may return several values packed in a tuple.",
    "Strings are immutable sequences of Unicode code points.",
    "The with statement wraps a block in a context manager.",
    "Generators produce values lazily, one at a time.",
    "Sets hold unique elements and support fast membership tests.",
    "Modules group related functions, classes and variables.",
    "A class defines the attributes and methods of its instances.",
    "Integers in Python have arbitrary precision.",
    "The import statement loads a module and binds its name.",
    "Slicing returns a new list holding part of the original.",
    "Lambda expressions create small anonymous functions.",
    "Decorators wrap a function to change its behaviour.",
    "The while loop runs as long as its condition is true.",
    "Keyword arguments are passed by name to a function.",
    "Floating point numbers follow the IEEE 754 standard.",
    "A comprehension builds a list from an iterable in one line.",
    "Files should be closed once they are no longer needed.",
    "The global statement declares names at module level.",
    "Tuples are immutable and can be used as dictionary keys.",
    "The pass statement does nothing and fills an empty block.",
]


def _words() -> list[str]:
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    return sorted({w.lower() for t in TEXTS for w, _ in split.pre_tokenize_str(t)})


def word_tokenizer(folder: Path, specials: list[str], single: str, config: dict) -> dict[str, int]:
    """tokenizer.json (lower-cased words, ``single`` as the template around a text) and
    tokenizer_config.json; returns the vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(specials + _words())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    used = [s for s in specials if s in single.split()]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(s, vocab[s]) for s in used])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return vocab


def bert_classifier(folder: Path, num_labels: int = 3, label_names: list[str] | None = None) -> Path:
    """``BertForSequenceClassification``: 2 layers of width 32; ``label_names`` become its label2id."""
    from transformers import BertConfig, BertForSequenceClassification

    vocab = word_tokenizer(folder, ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "[CLS] $A [SEP]",
                           {"pad_token": "[PAD]", "model_max_length": 64})
    extra = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}} \
        if label_names else {}
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels, pad_token_id=0, **extra)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).eval().save_pretrained(folder)
    return folder


def llama_lm(folder: Path, tie: bool = True) -> Path:
    """``LlamaForCausalLM``: 2 layers of width 32, grouped-query attention, the LM head tied to the embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = word_tokenizer(folder, ["<pad>", "<unk>", "<s>", "</s>"], "<s> $A",
                           {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"})
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
