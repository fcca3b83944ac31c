"""Hugging Face model folders (config.json + safetensors weights), loaded offline with ``transformers``.

The folder's model is wrapped so that it takes what a text task feeds, one int64 tensor of token
ids ``(N, L)`` right-padded with the tokenizer's padding token (the attention mask is ``ids != pad``,
computed inside), and returns one tensor:

* sentence-transformers folders and plain encoders (``BertModel``, ...): the pooled embedding
  ``(N, H)`` (mean pooling unless ``1_Pooling/config.json`` says otherwise), L2-normalised unless the
  folder's ``modules.json`` lists no ``Normalize`` step;
* ``*ForSequenceClassification``: the logits ``(N, C)``;
* ``*ForCausalLM``: the logits ``(N, L, V)``.

The wrapper's children are the transformers model's own, so layers keep their usual names
(``encoder.layer.0.attention.self.query``) and the state dict (hashed into the Run) is the
checkpoint's. Loading never runs code from the folder (``trust_remote_code=False``) and reads
safetensors only (a ``pytorch_model.bin`` is a pickle).

Two changes make every weight a layer the engine can quantize on its own, without changing FP32
outputs or the state dict's names: GPT-2's ``Conv1D`` (a transposed Linear) becomes ``nn.Linear``,
and a Linear whose weight is tied to another module (an LM head tied to the input embedding) gets
its own copy, so quantizing the head leaves the embedding as it is.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from analysis.data.hf_folder import architecture, is_hf_folder, pad_token_id, read_json
from analysis.models.base import ModelError

POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                "pooling_mode_lasttoken": "lasttoken"}  # in sentence-transformers' order of concatenation
ST_MODULES = {"Transformer", "Pooling", "Normalize"}  # sentence-transformers modules this wrapper reproduces


def _pool(h: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One pooling of hidden states ``(N, L, H)`` over the real tokens (``mask`` (N, L), float)."""
    m = mask.unsqueeze(-1)
    if mode == "cls":
        return h[:, 0]
    if mode == "max":
        return h.masked_fill(m == 0, torch.finfo(h.dtype).min).max(1).values
    if mode == "lasttoken":  # right padding: the last real token
        last = (mask.sum(1).long() - 1).clamp_min(0)
        return h[torch.arange(h.shape[0]), last]
    summed, count = (h * m).sum(1), m.sum(1).clamp_min(1e-9)
    return summed / (count.sqrt() if mode == "mean_sqrt_len" else count)


class HFTokenModel(nn.Module):
    """ids ``(N, L)`` -> one tensor, around a transformers model whose children become this module's."""

    def __init__(self, hf: nn.Module, head: str, pad_id: int, pooling: tuple[str, ...] = ("mean",),
                 normalize: bool = True) -> None:
        super().__init__()
        for name, child in hf.named_children():
            self.add_module(name, child)
        for name, p in hf.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in hf.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in hf._non_persistent_buffers_set)
        object.__setattr__(self, "hf", hf)  # not registered: the names stay transformers' own
        self.head, self.pad_id, self.pooling, self.normalize = head, pad_id, tuple(pooling), normalize

    def train(self, mode: bool = True) -> "HFTokenModel":
        self.hf.train(mode)  # the transformers model reads its own ``training`` flag too
        return super().train(mode)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).long()
        if self.head == "causal":
            return self.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = self.hf(input_ids=ids, attention_mask=mask)
        if self.head == "classification":
            return out.logits
        m = mask.to(out.last_hidden_state.dtype)
        pooled = torch.cat([_pool(out.last_hidden_state, m, p) for p in self.pooling], dim=-1)
        return F.normalize(pooled, p=2.0, dim=1) if self.normalize else pooled


def _sentence_transformers(folder: Path) -> tuple[tuple[str, ...], bool, str]:
    """``(pooling modes, normalize, note)`` from modules.json and 1_Pooling/config.json (mean and L2
    normalisation for a folder without them)."""
    if not (folder / "modules.json").is_file():
        return ("mean",), True, "mean pooling, L2-normalised"
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        types = [(m.get("type", ""), m.get("path", "")) for m in modules]
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise ModelError(f"{folder / 'modules.json'}: not a list of modules ({type(e).__name__})") from None
    short = [t.rsplit(".", 1)[-1] for t, _ in types]
    extra = [t for t, s in zip(types, short) if s not in ST_MODULES]
    if extra:
        raise ModelError(f"{folder / 'modules.json'}: module '{extra[0][0]}' is not supported "
                         f"(supported: {', '.join(sorted(ST_MODULES))})")
    modes: tuple[str, ...] = ("mean",)
    pool_path = next((p for (_, p), s in zip(types, short) if s == "Pooling"), None)
    if pool_path is not None and (folder / pool_path / "config.json").is_file():
        cfg_file = folder / pool_path / "config.json"
        cfg = read_json(cfg_file, ModelError)
        if isinstance(cfg.get("pooling_mode"), str):
            modes = (cfg["pooling_mode"].replace("mean_sqrt_len_tokens", "mean_sqrt_len"),)
        else:
            modes = tuple(mode for key, mode in POOLING_KEYS.items() if cfg.get(key))
            other = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v and k not in POOLING_KEYS]
            if other:
                raise ModelError(f"{cfg_file}: field '{other[0]}' is not supported "
                                 f"(supported: {', '.join(POOLING_KEYS)})")
        if not modes or any(m not in POOLING_KEYS.values() for m in modes):
            raise ModelError(f"{cfg_file}: no supported pooling mode (supported: {', '.join(POOLING_KEYS.values())})")
    normalize = "Normalize" in short
    return modes, normalize, f"{'+'.join(modes)} pooling{', L2-normalised' if normalize else ''}"


def _linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """transformers' GPT-2 ``Conv1D`` (y = x W + b, W (in, out)) as the equivalent ``nn.Linear``."""
    W = conv.weight.detach()
    lin = nn.Linear(W.shape[0], W.shape[1], bias=conv.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(W.T)
        if conv.bias is not None:
            lin.bias.copy_(conv.bias.detach())
    return lin


def _own_weights(model: nn.Module) -> list[str]:
    """Replace Conv1D layers by Linear ones and untie Linear weights shared with another module;
    returns what was changed, for the Run's source."""
    from transformers.pytorch_utils import Conv1D

    notes = []
    convs = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    for name in convs:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, _linear_from_conv1d(getattr(parent, attr)))
    if convs:
        notes.append(f"{len(convs)} Conv1D layers as Linear")
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and owners.get(id(m.weight), 0) > 1:
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
            notes.append(f"{name}.weight untied")
    return notes


def load_hf_model(path: str | Path) -> tuple[nn.Module, str, str]:
    """``(module, name, source)`` for a Hugging Face model folder (see the module docstring).

    ``name`` is the folder as given (a Run's verify loads it again from there).

    Raises:
        ModelError: no config.json or safetensors weights, an unsupported head or sentence-transformers
            module, an architecture transformers does not know, or weights that do not load.
    """
    folder = Path(path)
    if not is_hf_folder(folder):
        raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        pickled = [p.name for p in folder.glob("*.bin")]
        hint = f" ({pickled[0]} is a pickle, refused: convert it to safetensors)" if pickled else ""
        raise ModelError(f"{path}: no .safetensors weights{hint}")
    arch, head = architecture(folder, ModelError)
    pooling, normalize, note = _sentence_transformers(folder) if head == "embedding" else ((), False, "logits")
    try:
        import transformers
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    except ImportError:
        raise ModelError(f"{path}: loading a Hugging Face folder needs transformers "
                         f"(pip install 'quantlens[text]')") from None
    auto = {"embedding": AutoModel, "classification": AutoModelForSequenceClassification,
            "causal": AutoModelForCausalLM}[head]
    transformers.utils.logging.disable_progress_bar()
    try:
        # weights the folder lacks are initialised: seeded, so the model (and its hash) is the same on every load
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            # eager attention: plain matmuls and softmax, which torch.onnx exports for verify and apply
            hf, info = auto.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False,
                                            use_safetensors=True, dtype=torch.float32, attn_implementation="eager",
                                            output_loading_info=True)
    except Exception as e:  # unknown model types, missing or mismatched weights: many exception types
        raise ModelError(f"{path}: transformers cannot load it as {auto.__name__} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    missing = sorted(info.get("missing_keys") or ())
    changes = ([f"{len(missing)} weight(s) not in the folder, initialised with seed 0: {', '.join(missing[:3])}"]
               if missing else []) + _own_weights(hf)
    pad_id = pad_token_id(folder, error=ModelError)
    model = HFTokenModel(hf.eval(), head, pad_id, pooling, normalize).eval()
    detail = "; ".join([note, f"padding id {pad_id}", *changes[:3]] + ([f"{len(changes) - 3} more"] if len(changes) > 3 else []))
    return model, str(path), f"{path} ({arch or type(hf).__name__}, transformers {transformers.__version__}: {detail})"
