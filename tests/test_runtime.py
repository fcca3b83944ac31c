"""Real kernels: apply builds a quantized ONNX model, verify measures it, latency fills the Run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from analysis.runtime.latency import measure_latency
from analysis.models.loading import load_model
from analysis.runtime.onnx_quantize import QuantizeError, quantize_model
from analysis.store.run import load_run
from analysis.runtime.session import RuntimeModelError
from analysis.api import VerifyError, apply_policy, verify_policy
from onnx_fixtures import digits_onnx, mlp_graph, onnx_run  # noqa: F401 - fixtures


@pytest.fixture
def run_copy(onnx_run, tmp_path):
    return load_run(shutil.copytree(onnx_run.path, tmp_path / "run"))


def _policy(run, layers, default="fp32"):
    return {"schema": "quantlens.policy/1", "model": {"sha256": run.model_sha256}, "default": default, "layers": layers}


def _plain_session(path_or_model):
    data = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _cos(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_matmulnbits_matches_the_engines_int4_fake_quant(tmp_path):
    """The engine's int4 (uint4, groups of 32, asymmetric) is what MatMulNBits computes."""
    x = np.random.default_rng(3).normal(size=(64, 64)).astype(np.float32)
    onnx.save(mlp_graph(), tmp_path / "m.onnx")
    m = load_model(str(tmp_path / "m.onnx"), torch.from_numpy(x[:2]))
    policy = {"mm1": "int4", "mm2": "int4"}
    q = quantize_model(m.model, m._olayers, policy, m.binding, x)
    assert [n.op_type for n in q.model.graph.node].count("MatMulNBits") == 2
    y_rt = _plain_session(q.model).run(None, {"x": x})[0]
    y_fake = m.run(torch.from_numpy(x), policy).numpy()
    y_fp32 = m.run(torch.from_numpy(x)).numpy()
    assert _cos(y_rt, y_fake).min() > 0.999999
    np.testing.assert_allclose(y_rt, y_fake, atol=1e-4)
    assert _cos(y_rt, y_fp32).mean() < 0.99999  # and the quantization is not a no-op


def test_apply_writes_a_model_with_real_integer_kernels(run_copy, tmp_path):
    names = run_copy.layer_names
    out = tmp_path / "q.onnx"
    a = apply_policy(run_copy, _policy(run_copy, {names[1]: "int4", names[4]: "int4", names[-1]: "fp32"}, "int8"), out)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert {"QLinearConv", "QGemm", "MatMulNBits", "DequantizeLinear"} <= set(ops)
    assert a.kernels[names[0]].startswith("QLinearConv") and a.kernels[names[4]] == "MatMulNBits"
    assert a.kernels[names[1]].startswith("DequantizeLinear(uint4, blocked)")
    assert a.formats[names[-1]] == "fp32" and names[-1] not in a.kernels
    s = _plain_session(out)
    from analysis.data.demos import digits_arrays

    d = digits_arrays()
    acc = (s.run(None, {s.get_inputs()[0].name: d["eval_inputs"]})[0].argmax(1) == d["eval_labels"]).mean()
    assert acc > 0.95


def test_verify_stores_a_measured_row_beside_the_projection(run_copy):
    names = run_copy.layer_names
    before = len(run_copy.policies)
    r = verify_policy(run_copy, _policy(run_copy, {n: "int8" for n in names[3:]}), name="mine", repeats=3)
    table = load_run(run_copy.path).policies
    assert len(table) == before + 1
    row = table.set_index("name").loc["mine"]
    assert row["kind"] == "user" and row["measured_on"].startswith(f"onnxruntime {ort.__version__}, CPU, 1 threads, 600")
    assert 0.9 < row["metric"] <= 1.0 and np.isfinite(row["projected_metric"]) and row["latency_ms"] > 0
    assert json.loads(row["layers_json"])[names[0]] == "fp32"
    assert r["kernels"][names[3]].startswith("QLinearConv") and r["bytes"] < run_copy.meta["baseline"]["bytes"]
    verify_policy(run_copy, _policy(run_copy, {names[-1]: "int4"}), name="mine", repeats=3)  # same name replaces
    assert len(load_run(run_copy.path).policies) == before + 1


def test_latency_fills_cost_and_meta_for_an_onnx_run(run_copy):
    lat = measure_latency(run_copy, repeats=3, warmup=1)
    run = load_run(run_copy.path)
    assert run.cost["latency_ms"].notna().all() and (run.cost["latency_source"] != "").all()
    assert run.cost["latency_spread_ms"].notna().all()
    src = run.cost.set_index(["layer", "format"])["latency_source"]
    assert "QLinearConv" in src[("/conv2/Conv", "int8")] and "MatMulNBits" in src[("/fc1/Gemm", "int4")]
    assert lat["threads"] == 1 and lat["fp32_ms"] > 0 and set(lat["uniform"]) == {"int8", "int4"}
    assert lat["uniform"]["int8"]["kernels"] == {"QGemm (static QOperator)": 3, "QLinearConv (static QOperator)": 4}
    assert run.meta["latency"]["provider"] == "CPUExecutionProvider"
    pol = run.policies.set_index("name")
    assert pol.loc[["fp32", "all-int8", "all-int4"], "latency_ms"].gt(0).all()


def test_latency_on_a_torch_run_exports_and_maps_names(digits_run, tmp_path):
    run = load_run(shutil.copytree(digits_run.path, tmp_path / "run"))
    measure_latency(run, repeats=2, warmup=1)
    cost = load_run(run.path).cost
    assert cost["latency_ms"].notna().all()
    assert set(cost["layer"]) == {"conv1", "conv2", "conv3", "conv4", "fc1", "fc2", "head"}


def test_latency_keeps_a_policies_row_a_verify_adds_while_it_runs(digits_run, tmp_path, monkeypatch):
    """A verify merging its row between latency's read and its write of ``policies`` must not lose it."""
    import threading

    import pandas as pd

    import analysis.runtime.latency as latency
    from analysis.store.run import merge_policy_rows

    run = load_run(shutil.copytree(digits_run.path, tmp_path / "run"))
    verified = pd.DataFrame([{**run.policies.iloc[0].to_dict(), "name": "verified-1", "kind": "user", "metric": 0.5}])
    real_replace = latency.replace_table
    verifies = []

    def replace_with_a_verify_in_between(r, name, df):
        if name == "policies" and not verifies:  # latency holds its new table and is about to write it
            verifies.append(threading.Thread(target=merge_policy_rows, args=(load_run(r.path), verified)))
            verifies[0].start()
            verifies[0].join(2.0)  # without the Run's lock it merges now and is overwritten next
        real_replace(r, name, df)

    monkeypatch.setattr(latency, "replace_table", replace_with_a_verify_in_between)
    measure_latency(run, repeats=2, warmup=1)
    verifies[0].join(60)
    pol = load_run(run.path).policies.set_index("name")
    assert "verified-1" in pol.index and pol.loc["verified-1", "metric"] == 0.5
    assert pol.loc[["fp32", "all-int8", "all-int4"], "latency_ms"].gt(0).all()


def test_a_policy_naming_a_missing_node_is_one_error_and_writes_nothing(run_copy, tmp_path, capsys):
    from analysis.cli.main import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_policy(run_copy, {"/nope/Conv": "int8"})))
    with pytest.raises(VerifyError, match=r"bad.json: field 'layers'.*/nope/Conv"):
        apply_policy(run_copy, bad, tmp_path / "q.onnx")
    assert main(["apply", str(run_copy.path), str(bad), "--out", str(tmp_path / "q.onnx")]) == 2
    assert main(["verify", str(run_copy.path), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("bad.json" in e for e in err)
    assert not (tmp_path / "q.onnx").exists() and list(tmp_path.glob(".q.onnx*")) == []
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**_policy(run_copy, {}), "model": {"sha256": "0" * 64}}))
    with pytest.raises(VerifyError, match="model.sha256"):
        apply_policy(run_copy, other)
    with pytest.raises(QuantizeError, match="cannot take int4"):
        _quantize_conv1_int4(run_copy)


def _quantize_conv1_int4(run):
    from analysis.runtime.session import resolve_model

    rm = resolve_model(run)
    quantize_model(rm.model, rm.layers, {"/conv1/Conv": "int4"}, rm.binding, np.zeros((2, 1, 8, 8), np.float32))


def test_the_model_must_be_at_hand_and_unchanged(run_copy, tmp_path, capsys):
    from analysis.cli.main import main

    src = run_copy.meta["model"]["source"]
    moved = tmp_path / "moved.onnx"
    shutil.copy(src, moved)
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps(_policy(run_copy, {}, "int8")))
    run_copy.meta["model"]["source"] = str(tmp_path / "gone.onnx")
    with pytest.raises(RuntimeModelError, match="gone.onnx.*not at hand"):
        apply_policy(run_copy, policy)
    m = onnx.load(str(moved))
    m.doc_string = "edited"  # any byte changed: not the analysed model
    onnx.save(m, moved)
    run_copy.meta["model"]["source"] = str(moved)
    with pytest.raises(RuntimeModelError, match="has changed"):
        apply_policy(run_copy, policy)
    from analysis.store.run import update_meta

    update_meta(run_copy, model={**run_copy.meta["model"], "source": str(tmp_path / "gone.onnx")})
    assert main(["verify", str(run_copy.path), str(policy), "--quiet"]) == 2
    assert "not at hand" in capsys.readouterr().err


def test_cli_apply_and_verify(run_copy, tmp_path, capsys):
    from analysis.cli.main import main

    policy = tmp_path / "p.json"
    policy.write_text(json.dumps(_policy(run_copy, {"/conv1/Conv": "fp32"}, "int4")))
    assert main(["apply", str(run_copy.path), str(policy), "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "MatMulNBits" in out and (tmp_path / "m.onnx").is_file()
    assert main(["verify", str(run_copy.path), str(policy), "--quiet", "--name", "cli"]) == 0
    assert "cli: accuracy" in capsys.readouterr().out
    assert "cli" in set(load_run(run_copy.path).policies["name"])
