"""ONNX models in: analysis of an exported demo agrees with the torch path; odd graphs load; bad files fail cleanly."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from analysis.models.base import ModelError
from analysis.models.loading import load_model
from onnx_fixtures import digits_onnx, mlp_graph, onnx_run  # noqa: F401 - fixtures


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_onnx_run_has_every_table_and_provenance(onnx_run):
    m = onnx_run.meta
    assert m["model"]["kind"] == "onnx" and len(m["model"]["sha256"]) == 64
    assert m["sweep"]["path"] == "full-forward" and "onnx" in m["sweep"]["path_reason"]
    assert m["sweep"]["chunk_size"] is None and m["progress"] == {"done": m["sweep"]["jobs"], "total": m["sweep"]["jobs"]}
    assert onnx_run.layer_names == ["/conv1/Conv", "/conv2/Conv", "/conv3/Conv", "/conv4/Conv",
                                    "/fc1/Gemm", "/fc2/Gemm", "/head/Gemm"]
    assert onnx_run.layers["reaches_output"].all()
    sens = onnx_run.sensitivity.set_index(["layer", "format"])
    assert sens.loc[("/conv1/Conv", "int4"), "status"] == "skipped"  # K = 9: no group of 32
    assert {"input", "output", "weight"} <= set(onnx_run.histograms["tensor"])


def test_onnx_ranks_layers_as_the_torch_path_does(onnx_run, digits_run):
    """Same model, same data: per-layer KL ranking and the numbers themselves agree."""
    t = digits_run.sensitivity.query("status == 'ok'").set_index(["layer", "format"])
    o = onnx_run.sensitivity.query("status == 'ok'").copy()
    o["layer"] = o["layer"].str.split("/").str[1]  # /fc1/Gemm -> fc1 (the exporter's scope names)
    o = o.set_index(["layer", "format"]).loc[t.index]
    assert _spearman(t["kl"].to_numpy(), o["kl"].to_numpy()) >= 0.95
    top_t = set(t["kl"].nlargest(4).index)
    top_o = set(o["kl"].nlargest(4).index)
    assert len(top_t & top_o) >= 3
    np.testing.assert_allclose(o["weight_sqnr_db"], t["weight_sqnr_db"], rtol=1e-4)
    assert onnx_run.meta["baseline"]["metric"] == pytest.approx(digits_run.meta["baseline"]["metric"])
    assert onnx_run.meta["model"]["fp32_bytes"] == digits_run.meta["model"]["fp32_bytes"]


def test_fake_quant_in_graph_matches_the_torch_adapter(digits_onnx):
    """Weight fake-quant fed into the graph gives the torch model's output under the same policy."""
    from analysis.data.demos import digits_arrays
    from analysis.models.torch_model import TorchModel
    from analysis.data.demos import digits_model

    x = torch.from_numpy(digits_arrays()["eval_inputs"][:64])
    om = load_model(str(digits_onnx[0]), x[:2])
    tm = TorchModel(digits_model(), x[:2], name="demo:digits", source="demo")
    y_o = om.run(x, {"/fc1/Gemm": "int4", "/conv3/Conv": "int4"})
    y_t = tm.run(x, {"fc1": "int4", "conv3": "int4"})
    assert torch.allclose(y_o, y_t, atol=1e-4)
    assert not torch.allclose(y_o, om.run(x), atol=1e-4)  # the policy did change the output


def _load(path, x):
    return load_model(str(path), torch.from_numpy(x[:2]))


def test_old_opset_constant_weights_and_fixed_batch_load(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    path = tmp_path / "m.onnx"
    onnx.save(mlp_graph(opset=11, batch=1, constant_weight=True), path)
    m = _load(path, x)
    assert [l.name for l in m.layers()] == ["mm1", "mm2"]
    assert any("opset 11" in n for n in m.notes) and any("Constant" in n for n in m.notes)
    assert m.layer("mm1").weight_shape == (64, 64) and m.layer("mm1").macs == 64 * 64
    y = m.run(torch.from_numpy(x))  # batch 5 through a batch-1 input, in chunks
    assert y.shape == (5, 64) and torch.isfinite(y).all()
    W1 = m.weight("mm1").numpy().T  # back to the stored (in, out)
    W2 = m.weight("mm2").numpy().T
    np.testing.assert_allclose(y.numpy(), np.maximum(x @ W1, 0) @ W2, rtol=1e-4, atol=1e-4)


def test_shared_weights_are_reported_and_counted_once(tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    path = tmp_path / "m.onnx"
    onnx.save(mlp_graph(shared=True), path)
    m = _load(path, x)
    assert m.shared == {"W2": ["mm2", "mm3"]}
    assert any("shared" in n for n in m.notes)
    assert m.other_bytes() == 0
    assert m.params() == 64 * 64 * 2


def test_external_data_loads_and_a_missing_file_is_named(tmp_path):
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    path = tmp_path / "ext.onnx"
    onnx.save(mlp_graph(), path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    assert len(_load(path, x).layers()) == 2
    (tmp_path / "ext.data").unlink()
    with pytest.raises(ModelError, match="external-data file 'ext.data'"):
        _load(path, x)


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage that is not a protobuf \xff\xff"])
def test_unreadable_onnx_is_one_clear_error(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="bad.onnx"):
        _load(path, np.zeros((2, 64), np.float32))


def test_truncated_onnx_is_one_clear_error(tmp_path, digits_onnx):
    data = digits_onnx[0].read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cut.onnx"):
        _load(path, np.zeros((2, 1, 8, 8), np.float32))


def test_dimensions_the_data_does_not_bind(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(mlp_graph(), path)
    with pytest.raises(ModelError, match=r"expects dimension 1 = 64.*have 10"):
        _load(path, np.zeros((2, 10), np.float32))
    with pytest.raises(ModelError, match="rank 2"):
        _load(path, np.zeros((2, 8, 8), np.float32))


def test_cli_analyze_on_onnx_and_bad_file_exit_codes(tmp_path, capsys, digits_onnx):
    from analysis.cli.main import main

    path, data = digits_onnx
    assert main(["analyze", str(path), "--task", str(data), "--out", str(tmp_path / "R"), "--quiet"]) == 0
    assert "/fc1/Gemm" in capsys.readouterr().out
    (tmp_path / "bad.onnx").write_bytes(b"nope")
    assert main(["analyze", str(tmp_path / "bad.onnx"), "--task", str(data), "--out", str(tmp_path / "R2"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.onnx" in err[0]
    assert not (tmp_path / "R2").exists()
