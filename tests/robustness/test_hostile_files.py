"""Truncated and zero-length files: one line naming the file, exit code 2, nothing written."""
from __future__ import annotations

import pytest
from safetensors.torch import save_file

import factories
from analysis.cli.main import main


def _cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def _assert_one_line(code, err, expected):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


@pytest.fixture
def weights_bytes(tmp_path):
    p = tmp_path / "full.safetensors"
    save_file(factories.tiny_mlp().state_dict(), str(p))
    return p.read_bytes()


@pytest.mark.parametrize("keep", ["4 bytes", "header only", "half", "all but 3 bytes"])
def test_truncated_safetensors_weights(keep, weights_bytes, npz, tmp_path, capsys):
    cut = {"4 bytes": 4, "header only": 8 + int.from_bytes(weights_bytes[:8], "little"),
           "half": len(weights_bytes) // 2, "all but 3 bytes": len(weights_bytes) - 3}[keep]
    w = tmp_path / "cut.safetensors"
    w.write_bytes(weights_bytes[:cut])
    out = tmp_path / "out"
    code, err = _cli(["analyze", "factories:tiny_mlp", "--task", npz, "--weights", str(w), "--out", str(out),
                      "--quiet"], capsys)
    _assert_one_line(code, err, "cut.safetensors")
    assert not out.exists()


ZERO_LENGTH = {  # file -> (argv with {f} for the file and {npz} for a good task, text the error holds)
    "model.onnx": (["analyze", "{f}", "--task", "{npz}"], "empty file"),
    "model.safetensors": (["analyze", "{f}", "--task", "{npz}"], "empty file"),
    "weights.safetensors": (["analyze", "factories:tiny_mlp", "--task", "{npz}", "--weights", "{f}"], "empty file"),
    "weights.pt": (["analyze", "factories:tiny_mlp", "--task", "{npz}", "--weights", "{f}"], "empty file"),
    "task.npz": (["analyze", "factories:tiny_mlp", "--task", "{f}"], "not a readable .npz"),
}


@pytest.mark.parametrize("name", sorted(ZERO_LENGTH))
def test_zero_length_inputs_to_analyze(name, npz, tmp_path, capsys):
    f = tmp_path / name
    f.write_bytes(b"")
    argv, expected = ZERO_LENGTH[name]
    out = tmp_path / "out"
    code, err = _cli([a.format(f=f, npz=npz) for a in argv] + ["--out", str(out), "--quiet"], capsys)
    _assert_one_line(code, err, expected)
    assert name in err
    assert not out.exists()


@pytest.mark.parametrize("verb", ["report", "apply", "verify"])
def test_zero_length_policy(verb, tiny_run, tmp_path, capsys):
    pol = tmp_path / "empty.json"
    pol.write_bytes(b"")
    out = tmp_path / "out.file"
    argv = {"report": ["report", str(tiny_run.path), "--policy", str(pol), "--out", str(out)],
            "apply": ["apply", str(tiny_run.path), str(pol), "--out", str(out)],
            "verify": ["verify", str(tiny_run.path), str(pol)]}[verb]
    code, err = _cli(argv, capsys)
    _assert_one_line(code, err, "not valid JSON")
    assert not out.exists()
