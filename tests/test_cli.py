"""Bad input: one line naming the file or field, exit code 2, nothing left in --out."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def _run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def npz(tmp_path):
    p = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(p, inputs=rng.normal(size=(40, 64)).astype(np.float32), labels=rng.integers(0, 10, 40))
    return str(p)


def _bad_cases(tmp_path, npz):
    pickled = tmp_path / "model.pt"
    import factories

    torch.save(factories.tiny_mlp(), pickled)  # a whole pickled module, not a state dict
    nan = tmp_path / "nan.npz"
    x = np.zeros((10, 64), np.float32)
    x[3, 5] = np.nan
    np.savez(nan, inputs=x)
    noinputs = tmp_path / "noinputs.npz"
    np.savez(noinputs, data=np.zeros((4, 64), np.float32))
    wrongshape = tmp_path / "wrong.npz"
    np.savez(wrongshape, inputs=np.zeros((10, 7), np.float32))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    return {
        "missing path": (["analyze", str(tmp_path / "nope.onnx"), "--task", npz], "no such file"),
        "not a model": (["analyze", str(text), "--task", npz], "not a model"),
        "pickled checkpoint": (["analyze", str(pickled), "--task", npz], "refusing to unpickle"),
        "npz without inputs": (["analyze", "factories:tiny_mlp", "--task", str(noinputs)],
                               "the task's array 'data' is not an argument of forward(x)"),
        "rejected shape": (["analyze", "factories:tiny_mlp", "--task", str(wrongshape)], "rejected by the model"),
        "nan inputs": (["analyze", "factories:tiny_mlp", "--task", str(nan)], "NaN or Inf"),
        "no quantizable layers": (["analyze", "factories:no_layers", "--task", npz], "no quantizable layers"),
        "not a module": (["analyze", "factories:not_a_module", "--task", npz], "not a torch.nn.Module"),
        "unknown format": (["analyze", "factories:tiny_mlp", "--task", npz, "--formats", "int3"], "unknown format 'int3'"),
        "unknown task": (["analyze", "demo:digits", "--task", "mnist"], "unknown task 'mnist'"),
        "unknown demo": (["analyze", "demo:resnet"], "unknown demo model 'demo:resnet'"),
        "missing task": (["analyze", "factories:tiny_mlp"], "--task"),
        "bad metric": (["analyze", "factories:tiny_mlp", "--task", npz, "--metric", "f1"], "unknown metric 'f1'"),
        "calib too large": (["analyze", "factories:tiny_mlp", "--task", npz, "--calib", "400"], "--calib 400"),
    }


CASES = ["missing path", "not a model", "pickled checkpoint", "npz without inputs", "rejected shape", "nan inputs",
         "no quantizable layers", "not a module", "unknown format", "unknown task", "unknown demo", "missing task",
         "bad metric", "calib too large"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, npz, capsys):
    args, expected = _bad_cases(tmp_path, npz)[case]
    out = tmp_path / "out"
    code, err = _run(args + ["--out", str(out), "--quiet"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left behind


def test_non_empty_out_is_refused(tmp_path, npz, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(["analyze", "factories:tiny_mlp", "--task", npz, "--out", str(out)], capsys)
    assert code == 2 and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_weights_flag_loads_a_state_dict(tmp_path, npz, capsys):
    import factories
    from safetensors.torch import save_file

    m = factories.tiny_mlp()
    with torch.no_grad():
        m.fc1.weight.mul_(2)
    w = tmp_path / "w.safetensors"
    save_file(m.state_dict(), str(w))
    code = main(["analyze", "factories:tiny_mlp", "--task", npz, "--weights", str(w), "--out", str(tmp_path / "r"), "--quiet", "--no-latency", "--verify-policies", "0"])
    assert code == 0
    from analysis import load_run
    from analysis.models.torch_model import state_sha256

    assert load_run(tmp_path / "r").model_sha256 == state_sha256(m)


def test_console_script_end_to_end(tmp_path):
    """The installed `quantlens` entry point, as a user runs it (progress bar on stderr)."""
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    p = subprocess.run([str(Path(sys.executable).parent / "quantlens"), "analyze", "demo:digits", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "all-int4" in p.stdout and "sweep" in p.stderr
    assert (out / "run.json").is_file()
    bad = subprocess.run([str(Path(sys.executable).parent / "quantlens"), "analyze", "demo:digits", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("module, name, error", [
    ("analysis.store.bundle", "write_bundle", ValueError("an internal invariant broke")),
    ("analysis.report.render", "write_report", KeyError("no such column")),
])
def test_a_bug_inside_a_verb_keeps_its_traceback(module, name, error, digits_run, tmp_path, monkeypatch, capsys):
    """Only bad input (an InputError) is exit 2: a plain ValueError or KeyError is a bug and propagates."""
    import importlib

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(importlib.import_module(module), name, broken)
    verb = "bundle" if "bundle" in module else "report"
    with pytest.raises(type(error)):
        main([verb, str(digits_run.path), "--out", str(tmp_path / "x")])
    assert "error:" not in capsys.readouterr().err


def test_a_bug_exits_1_with_a_traceback(tmp_path):
    code = ("import sys, analysis.store.bundle as b\n"
            "def broken(*a, **k): raise ValueError('an internal invariant broke')\n"
            "b.write_bundle = broken\n"
            "from analysis.cli.main import main\n"
            f"sys.exit(main(['bundle', {str(tmp_path)!r}, '--out', {str(tmp_path / 'x.qlrun')!r}]))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" in p.stderr and "an internal invariant broke" in p.stderr


@pytest.mark.parametrize("argv, expected", [
    (["search", "{run}", "--out", "{tmp}/p.json"], "give a budget"),
    (["search", "{run}", "--max-drop", "0.01", "--out", "{tmp}"], "is a folder"),
    (["report", "{run}", "--policy", "{tmp}/absent.json", "--out", "{tmp}/r.html"], "absent.json: no such policy file"),
    (["analyze", "demo:digits", "--group-size", "3", "--out", "{tmp}/r"], "--group-size 3"),
    (["analyze", "demo:digits", "--threads", "-1", "--out", "{tmp}/r"], "--threads -1"),
    (["bundle", "{tmp}/absent", "--out", "{tmp}/b.qlrun"], "absent"),
])
def test_user_mistakes_outside_analyze_are_one_line_exit_2(argv, expected, digits_run, tmp_path, capsys):
    code, err = _run([a.format(run=digits_run.path, tmp=tmp_path) for a in argv], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
