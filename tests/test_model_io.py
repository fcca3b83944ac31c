"""Inputs and outputs as models have them: several inputs, tuple and dict outputs, a batch axis that is
not first, fixed batch sizes, batch dims written as -1. Each model is built here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from analysis.api import Policy, apply_policy, verify_policy
from analysis.data.batch import Inputs
from analysis.data.tasks import load_task
from analysis.engine.analyze import sweep_to_run
from analysis.engine.remeasure import measure_policies
from analysis.models.base import ModelError
from analysis.models.loading import load_model
from onnx_fixtures import mlp_graph

T, C, F = 6, 10, 16
ROOT = Path(__file__).resolve().parents[1]
QUICK = dict(formats=("int8",), progress=False, random_policies=2)


def _opts() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return so


def time_major_graph() -> onnx.ModelProto:
    """Fixed batch 1, output [T, 1, C] (a CTC recogniser's layout). Step 0 comes from layer ``early``,
    steps 1..T-1 from layer ``late``, so a comparison of step 0 alone never sees ``late``."""
    rng = np.random.default_rng(0)
    wa = rng.normal(0, 0.3, (F, C)).astype(np.float32)
    wb = rng.normal(0, 0.3, (F, (T - 1) * C)).astype(np.float32)
    inits = [numpy_helper.from_array(wa, "Wa"), numpy_helper.from_array(wb, "Wb"),
             numpy_helper.from_array(np.array([1, 1, C], np.int64), "s1"),
             numpy_helper.from_array(np.array([1, T - 1, C], np.int64), "s2")]
    nodes = [helper.make_node("MatMul", ["x", "Wa"], ["a"], name="early"),
             helper.make_node("Reshape", ["a", "s1"], ["a3"], name="ra"),
             helper.make_node("MatMul", ["x", "Wb"], ["b"], name="late"),
             helper.make_node("Reshape", ["b", "s2"], ["b3"], name="rb"),
             helper.make_node("Concat", ["a3", "b3"], ["y3"], name="cat", axis=1),
             helper.make_node("Transpose", ["y3"], ["y"], name="tr", perm=[1, 0, 2])]
    g = helper.make_graph(nodes, "ctc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, F])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, 1, C])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def two_input_graph(batch=-1) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (16, 32)).astype(np.float32), "Wa"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 32)).astype(np.float32), "Wb"),
             numpy_helper.from_array(rng.normal(0, 0.3, (32, 5)).astype(np.float32), "Wh")]
    nodes = [helper.make_node("MatMul", ["a", "Wa"], ["ha"], name="pa"),
             helper.make_node("MatMul", ["b", "Wb"], ["hb"], name="pb"),
             helper.make_node("Add", ["ha", "hb"], ["h"], name="add"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "Wh"], ["y"], name="head")]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [batch, 16]),
                                         helper.make_tensor_value_info("b", TensorProto.FLOAT, [batch, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _features(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, d)).astype(np.float32)


# ---- batch axis not first, fixed batch -----------------------------------------------------------

def test_time_major_fixed_batch_compares_every_step(folder):
    onnx.save(time_major_graph(), folder / "ctc.onnx")
    x = _features(9, F, 0)
    tm = load_model(str(folder / "ctc.onnx"), x[:3])
    assert tm.binding.batch == 1
    assert tm.outputs.outputs[0].batch_axis == 1
    y = tm.run(torch.from_numpy(x)).numpy()
    s = ort.InferenceSession(str(folder / "ctc.onnx"), _opts(), providers=["CPUExecutionProvider"])
    want = np.stack([s.run(None, {"x": x[i:i + 1]})[0][:, 0, :] for i in range(len(x))])
    assert y.shape == (9, T, C)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_time_major_sweep_sees_the_later_steps(folder):
    onnx.save(time_major_graph(), folder / "ctc.onnx")
    np.savez(folder / "d.npz", inputs=_features(24, F, 0))
    run = sweep_to_run(str(folder / "ctc.onnx"), str(folder / "d.npz"), folder / "run", metric="cosine", **QUICK)
    sens = run.sensitivity.set_index("layer")
    # 'late' writes steps 1..T-1 only: judged on step 0 alone, its metric would not move at all
    assert sens.loc["late", "metric"] < run.meta["baseline"]["metric"] - 1e-6
    out = run.meta["model"]["outputs"]
    assert out["elements_per_sample"] == T * C
    assert out["outputs"][0]["batch_axis"] == 1 and out["outputs"][0]["compared"]
    assert out["outputs"][0]["shape"] == [T, "N", C]


def test_torch_time_major_output(folder):
    x = _features(8, F, 2)
    tm = load_model("io_factories:time_major", x[:3])
    assert tm.outputs.outputs[0].batch_axis == 1
    from io_factories import time_major

    want = time_major().eval()(torch.from_numpy(x)).transpose(0, 1)
    torch.testing.assert_close(tm.run(torch.from_numpy(x)), want)


def test_batch_written_as_minus_one(folder):
    onnx.save(mlp_graph(batch=-1), folder / "m.onnx")
    np.savez(folder / "d.npz", inputs=_features(20, 64, 3))
    run = sweep_to_run(str(folder / "m.onnx"), str(folder / "d.npz"), folder / "run", **QUICK)
    assert run.meta["status"] == "complete" and len(run.layer_names) == 2


# ---- several inputs ------------------------------------------------------------------------------

def test_onnx_two_inputs_from_named_arrays(folder):
    onnx.save(two_input_graph(), folder / "two.onnx")
    np.savez(folder / "d.npz", a=_features(20, 16, 4), b=_features(20, 8, 5))
    task = load_task(str(folder / "d.npz"))
    assert isinstance(task.eval_inputs, Inputs) and task.eval_inputs.names == ["a", "b"]
    run = sweep_to_run(str(folder / "two.onnx"), str(folder / "d.npz"), folder / "run", **QUICK)
    assert sorted(run.layer_names) == ["head", "pa", "pb"]
    assert run.meta["data"]["input_shape"] == {"a": [16], "b": [8]}
    # the runtime takes the same named arrays: the all-int8 model verifies within the engine's figure
    row = verify_policy(run, Policy(run.model_sha256, {}, default="int8"), repeats=0)
    uniform = run.meta["uniform"]["int8"]["metric"]
    assert abs(row["metric"] - uniform) < 0.05
    # the engine itself re-measures a policy on the Run's file (found by its path, not its name)
    again = measure_policies(run, {"all": {n: "int8" for n in run.layer_names}})["all"]
    assert again["metric"] == pytest.approx(uniform, abs=1e-9)


def test_onnx_missing_input_names_it(folder):
    onnx.save(two_input_graph(), folder / "two.onnx")
    np.savez(folder / "d.npz", a=_features(20, 16, 4))
    with pytest.raises(ModelError, match="model input 'b' is not in the task"):
        sweep_to_run(str(folder / "two.onnx"), str(folder / "d.npz"), folder / "run", **QUICK)
    assert not (folder / "run" / "run.json").exists()


def test_one_array_for_two_inputs_says_what_to_save(folder):
    onnx.save(two_input_graph(), folder / "two.onnx")
    np.savez(folder / "d.npz", inputs=_features(20, 16, 4))
    with pytest.raises(ModelError, match=r"2 inputs \(a, b\).*one array per input name"):
        sweep_to_run(str(folder / "two.onnx"), str(folder / "d.npz"), folder / "run", **QUICK)


def test_npz_calibration_per_input(folder):
    np.savez(folder / "d.npz", a=_features(10, 16, 4), b=_features(10, 8, 5), calib_a=_features(3, 16, 6))
    with pytest.raises(ValueError, match="field 'calib_b' is missing"):
        load_task(str(folder / "d.npz"))
    np.savez(folder / "d.npz", a=_features(10, 16, 4), b=_features(10, 8, 5), calib_a=_features(3, 16, 6),
             calib_b=_features(3, 8, 7))
    t = load_task(str(folder / "d.npz"))
    assert len(t.calib_inputs) == 3 and len(t.eval_inputs) == 10


def test_torch_two_inputs_sweep_and_verify(folder):
    np.savez(folder / "d.npz", a=_features(24, 16, 4), b=_features(24, 8, 5))
    run = sweep_to_run("io_factories:two_inputs", str(folder / "d.npz"), folder / "run", **QUICK)
    assert sorted(run.layer_names) == ["head", "pa", "pb"]
    assert run.meta["sweep"]["path"] == "fx-incremental"  # fx traces forward(a, b) fed by name
    applied = apply_policy(run, Policy(run.model_sha256, {}, default="int8"))
    assert [i.name for i in applied.model.graph.input] == ["a", "b"]
    row = verify_policy(run, Policy(run.model_sha256, {}, default="int8"), repeats=0)
    assert abs(row["metric"] - run.meta["uniform"]["int8"]["metric"]) < 0.05


# ---- tuple and dict outputs ----------------------------------------------------------------------

def test_tuple_outputs_are_compared_whole(folder):
    x = _features(8, F, 6)
    tm = load_model("io_factories:tuple_out", x[:3])
    assert [o.name for o in tm.outputs.outputs] == ["output.0", "output.1"]
    assert tm.outputs.selected == [0, 1]
    y = tm.run(torch.from_numpy(x))
    assert y.shape == (8, 4 + 8)
    # each output divided by its own FP32 scale: the x100 logits do not drown the embedding
    left, right = y[:, :4].pow(2).mean().sqrt(), y[:, 4:].pow(2).mean().sqrt()
    assert 0.3 < float(left / right) < 3


def test_dict_output_named_and_scalar_left_out(folder):
    x = _features(8, F, 7)
    tm = load_model("io_factories:dict_out", x[:3])
    assert [o.name for o in tm.outputs.outputs] == ["logits", "embedding", "loss"]
    assert tm.outputs.outputs[2].batch_axis is None and tm.outputs.selected == [0, 1]
    assert any("'loss'" in n and "not compared" in n for n in tm.outputs.notes)
    one = load_model("io_factories:dict_out", x[:3], output="embedding")
    assert one.run(torch.from_numpy(x)).shape == (8, 8)
    with pytest.raises(ModelError, match="--output nope: .*'logits'"):
        load_model("io_factories:dict_out", x[:3], output="nope")


def test_selected_output_survives_verify(folder):
    np.savez(folder / "d.npz", inputs=_features(24, F, 8))
    run = sweep_to_run("io_factories:dict_out", str(folder / "d.npz"), folder / "run", output="logits", **QUICK)
    assert run.meta["model"]["output_arg"] == "logits"
    assert [o["compared"] for o in run.meta["model"]["outputs"]["outputs"]] == [True, False, False]
    row = verify_policy(run, Policy(run.model_sha256, {}, default="int8"), repeats=0)
    assert abs(row["metric"] - run.meta["uniform"]["int8"]["metric"]) < 0.05


def test_cli_output_flag_unknown_name_is_one_line(folder):
    np.savez(folder / "d.npz", inputs=_features(24, F, 8))
    r = subprocess.run([sys.executable, "-m", "analysis.cli.main", "analyze", "io_factories:dict_out", "--task",
                        str(folder / "d.npz"), "--out", str(folder / "run"), "--output", "nope", "--no-latency"],
                       capture_output=True, text=True, cwd=folder,
                       env={"PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--output nope" in r.stderr
    assert not (folder / "run" / "run.json").exists()


def test_console_summary_says_what_was_compared(folder):
    from analysis.cli.main import summary

    np.savez(folder / "d.npz", inputs=_features(24, F, 8))
    run = sweep_to_run("io_factories:dict_out", str(folder / "d.npz"), folder / "run", **QUICK)
    text = summary(run)
    assert "compared: logits (N, 4), embedding (N, 8) (12 values per sample)" in text
    assert "output 'loss' () is not compared (no batch axis)" in text
    ctc = folder / "ctc.onnx"
    onnx.save(time_major_graph(), ctc)
    np.savez(folder / "c.npz", inputs=_features(12, F, 0))
    text = summary(sweep_to_run(str(ctc), str(folder / "c.npz"), folder / "run2", metric="cosine", **QUICK))
    assert f"compared: y ({T}, N, {C}) ({T * C} values per sample)" in text


def test_report_says_what_was_compared(folder):
    from analysis.api import render_html

    np.savez(folder / "d.npz", inputs=_features(24, F, 8))
    run = sweep_to_run("io_factories:dict_out", str(folder / "d.npz"), folder / "run", **QUICK)
    html = render_html(run)
    assert "<dt>Compared</dt><dd>logits (N, 4), embedding (N, 8) — 12 values per sample;" in html
    assert "output &#x27;loss&#x27; () is not compared (no batch axis)" in html


def test_torch_missing_argument_names_it(folder):
    np.savez(folder / "d.npz", a=_features(12, 16, 4))
    with pytest.raises(ModelError, match="forward argument 'b' is not in the task"):
        sweep_to_run("io_factories:two_inputs", str(folder / "d.npz"), folder / "run", **QUICK)
    assert not (folder / "run" / "run.json").exists()


def test_readme_ctc_metric_runs_on_a_time_major_model(folder):
    """The README's user-metric example, as printed there, on a [T, 1, C] model."""
    text = (ROOT / "README.md").read_text()
    code = text.split("# ctc_metric.py, in the folder you run quantlens from\n", 1)[1].split("```", 1)[0]
    (folder / "ctc_metric.py").write_text(code)
    onnx.save(time_major_graph(), folder / "ctc.onnx")
    np.savez(folder / "d.npz", inputs=_features(24, F, 0))
    run = sweep_to_run(str(folder / "ctc.onnx"), str(folder / "d.npz"), folder / "run",
                       metric="ctc_metric:string_accuracy", **QUICK)
    assert run.meta["metric"]["name"] == "ctc_metric:string_accuracy" and run.higher_is_better
    assert run.meta["baseline"]["metric"] == 1.0
    assert 0.0 <= run.meta["uniform"]["int8"]["metric"] <= 1.0


def test_named_arrays_in_another_order_than_forward_verify_alike(folder):
    """The export names graph inputs in forward()'s order whatever order the task's arrays come in."""
    np.savez(folder / "d.npz", b=_features(24, 8, 5), a=_features(24, 16, 4))
    run = sweep_to_run("io_factories:two_inputs", str(folder / "d.npz"), folder / "run", **QUICK)
    row = verify_policy(run, Policy(run.model_sha256, {}, default="int8"), repeats=0)
    assert abs(row["metric"] - run.meta["uniform"]["int8"]["metric"]) < 0.05


def test_several_outputs_are_not_scored_as_class_scores(folder):
    x = _features(24, F, 8)
    np.savez(folder / "d.npz", inputs=x, labels=np.arange(24) % 4)
    run = sweep_to_run("io_factories:tuple_out", str(folder / "d.npz"), folder / "run", **QUICK)
    assert run.meta["metric"]["name"] == "cosine" and "2 model outputs" in run.meta["metric"]["chosen_because"]
    with pytest.raises(ValueError, match="metric 'accuracy' reads class scores.*--output NAME"):
        sweep_to_run("io_factories:tuple_out", str(folder / "d.npz"), folder / "run2", metric="accuracy", **QUICK)
    one = sweep_to_run("io_factories:tuple_out", str(folder / "d.npz"), folder / "run3", output="output.0", **QUICK)
    assert one.meta["metric"]["name"] == "accuracy"


def test_fixed_batch_model_with_a_scalar_output_and_a_two_sample_task(folder):
    """A fixed batch of 4 with a 0-d 'loss' beside 'y' is fed in pieces; a task with 2 samples still tells axes."""
    rng = np.random.default_rng(3)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc"),
         helper.make_node("ReduceMean", ["y"], ["loss"], name="mean", keepdims=0)],
        "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, F])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3]),
         helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (F, 3)).astype(np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), folder / "f.onnx")
    tm = load_model(str(folder / "f.onnx"), _features(3, F, 1))
    assert tm.outputs.selected == [0]
    assert tm.run(torch.from_numpy(_features(10, F, 2))).shape == (10, 3)
    short = load_model("io_factories:tuple_out", _features(1, F, 1))  # one sample: repeated to tell the axes
    assert [o.batch_axis for o in short.outputs.outputs] == [0, 0]
