"""Command-line input: folders where files belong, policies for another model, metrics that cannot move or
raise, the analyze flags other parts of the engine take, the summary's ranking, and library chatter kept
off the console."""
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.cli.library_log import LOG_NAME, library_log
from analysis.cli.main import main, summary
from analysis.store.policy import Policy

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--quiet", "--no-latency", "--verify-policies", "0"]


def _run(args, capsys):
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder for modules the CLI imports by name (models and metrics), cleaned up after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)

    def write(name: str, body: str) -> None:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))

    yield write
    for k in set(sys.modules) - before:
        if k.startswith("cli_inputs_"):
            del sys.modules[k]


MODELS = """
    import torch
    from torch import nn


    class Scalar(nn.Module):
        '''One value per sample, e.g. a voice-activity probability.'''

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1 = nn.Linear(16, 32)
            self.fc2 = nn.Linear(32, 1)

        def forward(self, x):
            return torch.sigmoid(self.fc2(torch.relu(self.fc1(x))))


    def scalar():
        return Scalar()
"""

METRICS_MODULE = """
    def broken(y_fp32, y_q, labels):
        raise ValueError("labels are required by this metric")


    def neg_max_err(y_fp32, y_q, labels):
        '''Minus the largest absolute error per sample.'''
        return -(y_q - y_fp32).abs().flatten(1).amax(1)
"""


@pytest.fixture
def scalar_task(tmp_path):
    p = tmp_path / "vad.npz"
    np.savez(p, inputs=np.random.default_rng(0).normal(size=(48, 16)).astype(np.float32))
    return p


# ---- a folder where a file belongs, a file where a folder belongs ---------------------------------

@pytest.mark.parametrize("argv, expected", [
    (["report", "{run}", "--policy", "{tmp}/adir", "--out", "{tmp}/r.html"], "--policy {tmp}/adir: is a folder, not a policy file"),
    (["report", "{run}", "--out", "{tmp}/adir"], "--out {tmp}/adir: is a folder"),
    (["report", "{run}", "--out", "{tmp}/afile/r.html"], "--out {tmp}/afile/r.html: {tmp}/afile is a file, not a folder"),
    (["apply", "{run}", "{tmp}/adir", "--out", "{tmp}/m.onnx"], "{tmp}/adir: is a folder, not a policy file"),
    (["apply", "{run}", "{tmp}/p.json", "--out", "{tmp}/afile/m.onnx"], "{tmp}/afile is a file, not a folder"),
    (["verify", "{run}", "{tmp}/adir"], "{tmp}/adir: is a folder, not a policy file"),
    (["search", "{run}", "--max-drop", "0.01", "--out", "{tmp}/afile/p.json"], "{tmp}/afile is a file, not a folder"),
    (["bundle", "{run}", "--out", "{tmp}/adir"], "--out {tmp}/adir: is a folder"),
    (["bundle", "{run}", "--out", "{tmp}/afile/b.qlrun"], "{tmp}/afile is a file, not a folder"),
    (["analyze", "demo:digits", "--out", "{tmp}/afile/run"], "--out {tmp}/afile/run: {tmp}/afile is a file, not a folder"),
    (["analyze", "demo:digits", "--weights", "{tmp}/adir", "--out", "{tmp}/run"], "--weights {tmp}/adir: is a folder"),
])
def test_folders_and_files_in_the_wrong_place_are_one_line_exit_2(argv, expected, digits_run, tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "p.json").write_text(Policy(digits_run.model_sha256, {}).to_json())
    code, _, err = _run([a.format(run=digits_run.path, tmp=tmp_path) for a in argv], capsys)
    assert code == 2
    assert expected.format(tmp=tmp_path) in _one_line(err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "r.html").exists() and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("verb", ["report", "apply", "verify"])
def test_a_policy_for_another_model_is_refused_everywhere_with_one_message(verb, digits_run, tmp_path, capsys):
    foreign = tmp_path / "foreign.json"
    foreign.write_text(Policy("ab" * 32, {digits_run.layer_names[0]: "int8"}).to_json())
    args = {"report": ["--policy", foreign, "--out", tmp_path / "r.html"], "apply": [foreign, "--out", tmp_path / "m.onnx"],
            "verify": [foreign]}[verb]
    rows_before = len(digits_run.policies)
    code, _, err = _run([verb, digits_run.path, *args], capsys)
    assert code == 2
    line = _one_line(err)
    assert (f"quantlens {verb}: error: {foreign}: field 'model.sha256': the policy is for model abababababab…, "
            f"Run {digits_run.path} holds {digits_run.model_sha256[:12]}…") == line
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "m.onnx").exists()
    from analysis.store.run import load_run

    assert len(load_run(digits_run.path).policies) == rows_before


def test_report_with_the_runs_own_policy_still_applies_it(digits_run, tmp_path, capsys):
    own = tmp_path / "own.json"
    own.write_text(Policy(digits_run.model_sha256, {digits_run.layer_names[-1]: "int8"}).to_json())
    code, out, _ = _run(["report", digits_run.path, "--policy", own, "--format", "md", "--out", tmp_path / "r.md"], capsys)
    assert code == 0 and "from own.json" in (tmp_path / "r.md").read_text()


# ---- metrics on the command line -------------------------------------------------------------------

def test_a_scalar_output_is_measured_with_nmse_and_says_why(workdir, scalar_task, tmp_path, capsys):
    workdir("cli_inputs_models", MODELS)
    out = tmp_path / "run"
    code, stdout, err = _run(["analyze", "cli_inputs_models:scalar", "--task", scalar_task, "--out", out, *QUIET], capsys)
    assert code == 0, err
    meta = json.loads((out / "run.json").read_text())["metric"]
    assert meta["name"] == "nmse" and meta["higher_is_better"] is False
    assert "cosine similarity cannot move here" in meta["chosen_because"]
    assert "one value per sample (shape (" in meta["chosen_because"]
    assert f"metric nmse, as {meta['chosen_because']}" in stdout
    assert "largest nmse rise with only that layer quantized" in stdout
    from analysis.api import Projector, best_policy, load_run

    run = load_run(out)
    sens = run.sensitivity[run.sensitivity["status"] == "ok"]
    assert (sens["metric"] >= 0).all() and (sens["metric_delta"] > 0).any()
    best = best_policy(Projector(run), max_drop=float(sens["metric"].max()))  # the budget is a rise for nmse
    assert best.projection.metric <= float(sens["metric"].max()) + 1e-12


def test_a_named_metric_that_cannot_move_is_exit_2(workdir, scalar_task, tmp_path, capsys):
    workdir("cli_inputs_models", MODELS)
    out = tmp_path / "run"
    code, _, err = _run(["analyze", "cli_inputs_models:scalar", "--task", scalar_task, "--metric", "cosine",
                         "--out", out, *QUIET], capsys)
    assert code == 2
    assert "metric 'cosine' cannot move on this model: the output holds one value per sample" in _one_line(err)
    assert not out.exists()


def test_a_metric_function_that_raises_is_one_line_naming_it(workdir, tmp_path, capsys):
    workdir("cli_inputs_metrics", METRICS_MODULE)
    data = tmp_path / "d.npz"
    np.savez(data, inputs=np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32))
    out = tmp_path / "run"
    code, _, err = _run(["analyze", "factories:tiny_mlp", "--task", data, "--metric", "cli_inputs_metrics:broken",
                         "--out", out, *QUIET], capsys)
    assert code == 2
    assert _one_line(err) == ("quantlens analyze: error: metric cli_inputs_metrics:broken raised ValueError: "
                              "labels are required by this metric")
    assert not out.exists()


@pytest.mark.parametrize("spec, expected", [
    ("cli_inputs_absent:fn", "metric 'cli_inputs_absent:fn': cannot import module 'cli_inputs_absent'"),
    ("cli_inputs_metrics:nope", "metric 'cli_inputs_metrics:nope': module 'cli_inputs_metrics' has no function 'nope'"),
])
def test_a_metric_that_cannot_be_found_is_exit_2(spec, expected, workdir, tmp_path, capsys):
    workdir("cli_inputs_metrics", METRICS_MODULE)
    data = tmp_path / "d.npz"
    np.savez(data, inputs=np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32))
    code, _, err = _run(["analyze", "factories:tiny_mlp", "--task", data, "--metric", spec,
                         "--out", tmp_path / "run", *QUIET], capsys)
    assert code == 2 and expected in _one_line(err)


def test_a_user_metric_runs_in_worker_processes_and_in_onnxruntime(workdir, scalar_task, tmp_path, capsys):
    """Workers (spawned) and verify find the metric by its name, from the working folder."""
    workdir("cli_inputs_models", MODELS)
    workdir("cli_inputs_metrics", METRICS_MODULE)
    out = tmp_path / "run"
    code, _, err = _run(["analyze", "cli_inputs_models:scalar", "--task", scalar_task, "--metric",
                         "cli_inputs_metrics:neg_max_err", "--executor", "process", "--workers", "1", "--quiet",
                         "--no-latency", "--verify-policies", "1", "--random-policies", "2", "--out", out], capsys)
    assert code == 0, err
    from analysis.api import load_run

    run = load_run(out)
    assert run.meta["metric"]["name"] == "cli_inputs_metrics:neg_max_err" and run.higher_is_better
    assert run.meta["metric"]["description"].endswith("Minus the largest absolute error per sample.")
    assert run.meta["sweep"]["executor"] == "process"
    sens = run.sensitivity[run.sensitivity["status"] == "ok"]
    assert len(sens) and (sens["metric"] <= 0).all() and (sens["metric"] < 0).any()
    assert run.meta["runtime_check"].get("verified", 0) >= 1, run.meta["runtime_check"]
    verified = run.policies[run.policies["kind"] == "verified"]
    assert len(verified) and np.isfinite(verified["metric"]).all() and (verified["metric"] <= 0).all()


# ---- flags the engine takes --------------------------------------------------------------------------

def test_analyze_passes_task_options_output_and_latency_budget(digits_run, tmp_path, monkeypatch, capsys):
    import analysis.api

    seen = {}

    def fake_analyze(model, task, out, **kwargs):
        seen.update(kwargs, model=model, task=task, out=out)
        return digits_run

    monkeypatch.setattr(analysis.api, "analyze", fake_analyze)
    code, stdout, _ = _run(["analyze", "demo:digits", "--out", tmp_path / "r", "--task-option", "text_column=sentence",
                            "--task-option", "sep= = ", "--output", "logits", "--latency-budget", "90", "--quiet"], capsys)
    assert code == 0 and "most sensitive" in stdout
    assert seen["task_options"] == {"text_column": "sentence", "sep": " = "}
    assert seen["output"] == "logits" and seen["latency_budget"] == 90.0
    seen.clear()
    assert _run(["analyze", "demo:digits", "--out", tmp_path / "r", "--quiet"], capsys)[0] == 0
    assert "task_options" not in seen and "output" not in seen and seen["latency_budget"] is None


@pytest.mark.parametrize("flags, expected", [
    (["--task-option", "text_column"], "--task-option 'text_column': expected KEY=VALUE"),
    (["--task-option", "=x"], "--task-option '=x': expected KEY=VALUE"),
    (["--task-option", "a=1", "--task-option", "a=2"], "--task-option a: given twice ('1' and '2')"),
    (["--latency-budget", "0"], "--latency-budget 0: must be a positive number of seconds"),
    (["--latency-budget", "-5"], "--latency-budget -5: must be a positive number of seconds"),
    (["--latency-budget", "nan"], "--latency-budget nan: must be a positive number of seconds"),
    (["--latency-budget", "10", "--no-latency"], "--latency-budget: nothing to budget with --no-latency"),
])
def test_malformed_analyze_flags_are_one_line_exit_2(flags, expected, tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = _run(["analyze", "demo:digits", "--out", out, *flags], capsys)
    assert code == 2 and expected in _one_line(err)
    assert not out.exists()


# ---- the summary's ranking ----------------------------------------------------------------------------

def _fake_run(name: str, higher_is_better: bool, rows: list[tuple[str, float, float, float]]):
    """A Run-like object with the fields ``summary`` reads; rows are (layer, metric_delta, loss_delta, kl)."""
    sens = pd.DataFrame([{"layer": l, "format": "int8", "status": "ok", "metric_delta": d, "loss_delta": ld, "kl": kl,
                          "output_sqnr_db": 30.0} for l, d, ld, kl in rows])
    meta = {"model": {"name": "m", "params": 10, "n_layers": len(rows)}, "data": {"task": "t", "n_eval": 8},
            "sweep": {"path": "full-forward", "seconds": 1.0},
            "metric": {"name": name, "loss": "nmse_to_fp32", "higher_is_better": higher_is_better},
            "baseline": {"metric": 1.0, "loss": 0.0, "bytes": 1000}, "uniform": {}}
    return types.SimpleNamespace(meta=meta, sensitivity=sens, higher_is_better=higher_is_better)


def _ranked(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("most sensitive"))
    return [l.split()[0] for l in lines[start + 1:]]


def test_summary_ranks_a_cosine_run_by_the_layers_that_moved():
    run = _fake_run("cosine", True, [("a", -0.001, 0.002, np.nan), ("b", -0.2, 0.4, np.nan), ("c", -0.05, 0.1, np.nan)])
    text = summary(run)
    assert _ranked(text) == ["b", "c", "a"]
    assert "largest cosine drop" in text and "KL" not in text.split("most sensitive")[1]


def test_summary_ranks_a_lower_is_better_run_by_its_rise():
    run = _fake_run("nmse", False, [("a", 0.3, 0.3, np.nan), ("b", 0.01, 0.01, np.nan), ("c", 0.9, 0.9, np.nan)])
    assert _ranked(summary(run)) == ["c", "a", "b"]


def test_summary_breaks_accuracy_ties_by_kl():
    run = _fake_run("accuracy", True, [("a", 0.0, 0.01, 1e-5), ("b", -0.01, 0.01, 1e-6), ("c", 0.0, 0.01, 3e-4)])
    text = summary(run)
    assert _ranked(text) == ["b", "c", "a"]
    assert "ties by KL to fp32" in text and "KL 3.00e-04" in text


# ---- library chatter goes to a log ---------------------------------------------------------------------

def test_library_chatter_goes_to_the_runs_log(digits_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(digits_run.path, run_dir)
    chatty = logging.getLogger("cli_inputs_chatty")
    handler = None
    try:
        with library_log("verify", run_dir) as log:
            handler = logging.StreamHandler(sys.stderr)  # made inside the verb, as a library imported then makes its own
            chatty.addHandler(handler)
            chatty.propagate = False
            warnings.warn("a library warning", UserWarning)
            chatty.warning("a library line through its own stderr handler")
            logging.getLogger("cli_inputs_other").warning("a library line through the root logger")
            print("our own progress line", file=sys.stderr)
    finally:
        chatty.removeHandler(handler)
    err = capsys.readouterr().err
    assert err == "our own progress line\n"
    assert log.path == run_dir / LOG_NAME
    text = log.path.read_text()
    for needle in ("== quantlens verify, ", "UserWarning: a library warning",
                   "a library line through its own stderr handler", "a library line through the root logger"):
        assert needle in text
    with library_log("search", run_dir) as quiet:
        print("nothing from libraries", file=sys.stderr)
    assert quiet.path is None and log.path.read_text() == text


def test_onnxruntime_native_warnings_go_to_the_log(tmp_path, capfd):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                          [numpy_helper.from_array(np.ones(3, np.float32), "unused_w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    with library_log("apply", None) as log:
        ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    assert "unused_w" not in capfd.readouterr().err
    assert log.path is not None and log.path.parent != tmp_path
    try:
        assert "Removing initializer 'unused_w'" in log.path.read_text()
    finally:
        log.path.unlink()


CHATTY_MODEL = """
    import logging, os, warnings
    import torch
    from torch import nn

    log = logging.getLogger("chattylib")
    log.addHandler(logging.StreamHandler())  # prints to stderr itself, as transformers does
    log.propagate = False


    class Chatty(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            warnings.warn("a library warning from forward")
            log.warning("a library log line")
            os.write(2, b"native chatter on fd 2\\n")
            os.write(1, b"native chatter on fd 1\\n")
            return self.fc(x)


    def model():
        return Chatty()
"""


def test_console_of_a_real_cli_run_holds_only_quantlens_lines(tmp_path):
    (tmp_path / "chatty.py").write_text(textwrap.dedent(CHATTY_MODEL))
    np.savez(tmp_path / "d.npz", inputs=np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([str(Path(sys.executable).parent / "quantlens"), "analyze", "chatty:model", "--task", "d.npz",
                        "--out", "r", "--threads", "1", *QUIET], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    for chatter in ("a library warning from", "library log line", "native chatter"):
        assert chatter not in p.stderr and chatter not in p.stdout
    assert "wrote r" in p.stdout and "most sensitive" in p.stdout
    assert p.stderr.strip() == f"note: library warnings and messages are in {Path('r') / LOG_NAME}"
    log = (tmp_path / "r" / LOG_NAME).read_text()
    for chatter in ("a library warning from forward", "a library log line", "native chatter on fd 2",
                    "native chatter on fd 1"):
        assert chatter in log
    # bad input: still one line, and it says where the library messages went
    bad = subprocess.run([str(Path(sys.executable).parent / "quantlens"), "analyze", "chatty:model", "--task", "d.npz",
                          "--metric", "accuracy", "--out", "r2", *QUIET], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2
    line = _one_line(bad.stderr)
    assert "(library messages: " in line and "native chatter" not in bad.stderr and not (tmp_path / "r2").exists()
    Path(line.split("(library messages: ")[1].rstrip(")")).unlink()
