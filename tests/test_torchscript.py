"""TorchScript archives as MODEL: told apart from state dicts, analysed through their ONNX export
(weights and activations quantized per layer), applied and verified from the Run's record."""
import sys
import textwrap
import zipfile

import numpy as np
import onnx
import pytest
import torch

from analysis import api
from analysis.errors import InputError
from analysis.models.base import ModelError
from analysis.models.loading import load_model
from analysis.models.torchscript import is_torchscript

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
QUICK = dict(formats=("int8",), latency=False, verify_policies=0, progress=False, random_policies=2)

NET = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                          nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))


    def net():
        torch.manual_seed(0)
        return Net().eval()
''')


@pytest.fixture
def net_module(tmp_path, monkeypatch):
    """The same small conv net as an importable factory (``ts_net:net``) and as a TorchScript archive."""
    (tmp_path / "ts_net.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("ts_net", None)
    import ts_net

    torch.jit.script(ts_net.net()).save(str(tmp_path / "net.pt"))
    return ts_net, tmp_path / "net.pt"


@pytest.fixture
def images(tmp_path):
    """A folder of two classes of 8 small images each: centred discs of random colours on noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    for c in ("disc", "square"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            a = rng.integers(0, 80, size=(40, 40, 3), dtype=np.uint8)
            yy, xx = np.mgrid[:40, :40]
            inside = (yy - 20) ** 2 + (xx - 20) ** 2 < 150 if c == "disc" else (abs(yy - 20) < 11) & (abs(xx - 20) < 11)
            a[inside] = rng.integers(120, 256, size=3)
            Image.fromarray(a).save(root / c / f"{i}.png")
    return root


def test_archives_are_told_apart_from_state_dicts(net_module, tmp_path):
    ts_net, archive = net_module
    traced = tmp_path / "traced.pt"
    torch.jit.trace(ts_net.net(), torch.randn(1, 3, 8, 8)).save(str(traced))
    state = tmp_path / "state.pt"
    torch.save(ts_net.net().state_dict(), state)
    other = tmp_path / "other.pt"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("x/code/readme.txt", "a zip, but not an archive")
    assert is_torchscript(archive) and is_torchscript(traced)
    assert not is_torchscript(state) and not is_torchscript(other) and not is_torchscript(tmp_path / "absent.pt")
    x = torch.randn(3, 3, 12, 12)
    with pytest.raises(ModelError, match="a checkpoint holds weights, not an architecture"):
        load_model(str(state), x)
    with pytest.raises(ModelError, match="holds its own weights"):
        load_model(str(archive), x, weights=str(state))
    with pytest.raises(ModelError, match="rejects the task's inputs of shape"):
        load_model(str(archive), torch.randn(3, 5, 12, 12))


def test_archive_is_analysed_like_its_torch_module_then_applied_and_verified(net_module, images, tmp_path):
    _, archive = net_module
    run = api.analyze(str(archive), str(images), tmp_path / "ts", **QUICK)
    assert run.meta["model"]["kind"] == "torchscript" and run.meta["model"]["name"] == str(archive)
    assert run.layer_names == ["features.0", "features.2", "head"]  # named after the archive's modules
    assert run.meta["metric"]["name"] == "accuracy" and run.meta["data"]["input_shape"] == [3, 224, 224]
    clip = run.clipping
    for layer in run.layer_names:  # activations are quantized too: calibrated input and output ranges
        rows = clip[(clip["layer"] == layer) & (clip["format"] == "int8")]
        assert {"weight", "input", "output"} <= set(rows["tensor"])

    ref = api.analyze("ts_net:net", str(images), tmp_path / "torch", **QUICK)
    assert ref.layer_names == run.layer_names
    a = run.sensitivity.set_index("layer").loc[run.layer_names]
    b = ref.sensitivity.set_index("layer").loc[run.layer_names]
    assert (a["kl"] > 0).all()
    # the export in onnxruntime's fake-quant measures what torch's fake-quant measures on the module
    np.testing.assert_allclose(a["kl"], b["kl"], rtol=0.01)
    np.testing.assert_allclose(a["output_sqnr_db"], b["output_sqnr_db"], atol=0.01)

    policy = api.Policy(run.model_sha256, {"features.0": "int8", "head": "int8"})
    out = api.apply_policy(run, policy, tmp_path / "q.onnx")
    ops = {n.op_type for n in onnx.load(str(out.path)).graph.node}
    assert {"QLinearConv", "Conv"} <= ops and out.formats["features.2"] == "fp32"
    row = api.verify_policy(run, policy, repeats=0)
    assert 0 <= row["metric"] <= 1 and np.isfinite(row["loss"]) and np.isfinite(row["projected_metric"])

    changed = net_module[0].net()
    with torch.no_grad():
        changed.head.bias += 1
    torch.jit.script(changed).save(str(archive))
    with pytest.raises(InputError, match="sha256 differs"):
        api.verify_policy(run, policy, repeats=0)
