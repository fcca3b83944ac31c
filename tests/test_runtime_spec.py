"""apply and verify build exactly what the Run measured: its formats as specified, and nothing else."""
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper

from analysis.api import VerifyError, analyze, apply_policy, load_run
from analysis.cli.main import main
from analysis.store.run import update_meta


@pytest.fixture(scope="module")
def run16(tmp_path_factory):
    d = tmp_path_factory.mktemp("g16")
    rng = np.random.default_rng(0)
    np.savez(d / "x.npz", inputs=rng.normal(size=(64, 64)).astype(np.float32), labels=rng.integers(0, 10, 64))
    return analyze("factories:tiny_mlp", str(d / "x.npz"), d / "run", group_size=16, progress=False, latency=False,
                   verify_policies=0, random_policies=2)


def _policy(run, layers):
    return {"schema": "quantlens.policy/1", "model": {"sha256": run.model_sha256}, "default": "fp32", "layers": layers}


def test_apply_builds_int4_at_the_group_size_the_run_measured(run16, tmp_path):
    assert run16.meta["format_specs"]["int4"]["weight"]["granularity"]["group_size"] == 16
    layer = run16.layer_names[0]
    out = tmp_path / "m.onnx"
    apply_policy(run16, _policy(run16, {layer: "int4"}), out)
    nbits = [n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 1
    assert {a.name: helper.get_attribute_value(a) for a in nbits[0].attribute}["block_size"] == 16  # not the default 32


def test_a_format_the_run_did_not_measure_is_one_line_exit_2(run16, tmp_path, capsys):
    assert "int8-dyn" not in run16.formats
    p = tmp_path / "p.json"
    p.write_text(json.dumps(_policy(run16, {run16.layer_names[0]: "int8-dyn"})))
    assert main(["verify", str(run16.path), str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "format 'int8-dyn' was not measured in this Run" in err
    with pytest.raises(VerifyError, match="re-run analyze with --formats including it"):
        apply_policy(run16, _policy(run16, {run16.layer_names[0]: "int8-dyn"}), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_a_run_from_the_older_engine_is_refused_with_how_to_rerun(run16, tmp_path, capsys):
    old = load_run(shutil.copytree(run16.path, tmp_path / "old"))
    sweep = {k: v for k, v in old.meta["sweep"].items() if k != "code"}  # what a Run of the previous engine holds
    update_meta(old, sweep=sweep)
    old = load_run(old.path)
    assert "code" not in old.meta["sweep"]
    p = tmp_path / "p.json"
    p.write_text(json.dumps(_policy(old, {old.layer_names[0]: "int8"})))
    for verb in (["verify", str(old.path), str(p)], ["apply", str(old.path), str(p), "--out", str(tmp_path / "o.onnx")]):
        assert main(verb) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert "made by an older engine (sweep/1)" in err and "quantlens analyze factories:tiny_mlp --task" in err
    assert not (tmp_path / "o.onnx").exists()
