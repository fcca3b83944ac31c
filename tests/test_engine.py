"""The torch adapter, the sweep paths and the size model."""
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.quant.sizes import layer_bytes
from analysis.quant.formats import INT4, INT8, FP32, get_format
from analysis.models.base import LayerInfo
from analysis.models.torch_graph import TracedGraph
from analysis.models.torch_model import TorchModel
from analysis.engine.stats import calibrate, collect_activation_stats
from analysis.engine.sweep import FULL_FORWARD, INCREMENTAL, run_sweep
from analysis.data.tasks import Task
import factories


def _task(n=96, seed=0, labels=True):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 64)).astype(np.float32)
    return Task("t", "test", x[:32], x[32:], rng.integers(0, 10, n - 32) if labels else None, batch_size=24)


def _prepared(module, task):
    tm = TorchModel(module, torch.from_numpy(task.eval_inputs[:2]), name="m", source="test")
    calibrate(tm, collect_activation_stats(tm, task.calib_batches), [INT8, INT4])
    return tm


def test_layers_found_in_execution_order_with_sizes():
    tm = _prepared(factories.tiny_mlp(), _task())
    infos = tm.layers()
    assert [i.name for i in infos] == ["fc1", "fc2", "out"]
    assert [i.order for i in infos] == [0, 1, 2]
    assert infos[0].params == 64 * 64 + 64 and infos[0].macs == 64 * 64 and infos[0].in_features == 64


def test_policy_is_applied_and_fully_undone_without_copies():
    module = factories.tiny_mlp()
    task = _task()
    tm = _prepared(module, task)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.from_numpy(task.eval_inputs[:8])
    y0 = tm.run(x)
    y1 = tm.run(x, {"fc1": "int8", "fc2": "int4"})
    assert not torch.equal(y0, y1)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert torch.equal(tm.run(x), y0)
    assert tm.module is module
    assert all(not m._forward_pre_hooks for m in module.modules())


def test_incremental_and_full_forward_sweeps_agree():
    task = _task()
    tm = _prepared(factories.tiny_mlp(), task)
    jobs = [(n, f) for n in ("fc1", "fc2", "out") for f in ("int8", "int4")]
    pol = {"all": {"fc1": "int4", "fc2": "int8", "out": "int8"}}
    inc = run_sweep(tm, task, "accuracy", jobs, pol, incremental=True)
    full = run_sweep(tm, task, "accuracy", jobs, pol, incremental=False)
    assert inc.path == INCREMENTAL and full.path == FULL_FORWARD
    for job in jobs:
        a, b = inc.jobs[job], full.jobs[job]
        assert a.state.result() == pytest.approx(b.state.result(), rel=1e-9, abs=1e-12)
        assert a.noise == pytest.approx(b.noise, rel=1e-6)
    assert inc.policies["all"].result() == pytest.approx(full.policies["all"].result())


def test_residual_demo_incremental_matches_full_forward():
    from analysis.data.demos import digits_model
    from analysis.data.tasks import digits_task

    task = digits_task()
    task.eval_inputs, task.eval_labels = task.eval_inputs[:96], task.eval_labels[:96]
    tm = _prepared(digits_model(), task)
    jobs = [("conv3", "int4"), ("conv4", "int8"), ("fc1", "int4")]
    inc = run_sweep(tm, task, "accuracy", jobs, {}, incremental=True)
    full = run_sweep(tm, task, "accuracy", jobs, {}, incremental=False)
    assert inc.path == INCREMENTAL
    for job in jobs:
        assert inc.jobs[job].state.result() == pytest.approx(full.jobs[job].state.result(), rel=1e-9, abs=1e-12)


def test_untraceable_model_falls_back_and_says_why():
    task = _task()
    tm = _prepared(factories.untraceable(), task)
    res = run_sweep(tm, task, "accuracy", [("fc1", "int8")], {}, incremental=True)
    assert res.path == FULL_FORWARD and "trace" in res.path_reason


@pytest.mark.parametrize("factory, node", [(factories.inplace_after_use, "fc1"), (factories.inplace_after_last, "relu_1")],
                         ids=["after-first-layer", "after-last-layer"])
def test_in_place_op_whose_tensor_is_read_again_falls_back_and_says_why(factory, node):
    task = _task()
    tm = _prepared(factory(), task)
    jobs = [("fc1", "int8"), ("fc2", "int8"), ("out", "int4")]
    res = run_sweep(tm, task, "accuracy", jobs, {}, incremental=True)
    assert res.path == FULL_FORWARD
    assert f"in-place operation 'mul_' modifies '{node}'" in res.path_reason and "trace" not in res.path_reason
    full = run_sweep(tm, task, "accuracy", jobs, {}, incremental=False)
    for job in jobs:
        assert res.jobs[job].state.result() == full.jobs[job].state.result()


def _unguarded():
    """TracedGraph as it was before it looked for in-place nodes: it neither copies nor refuses them."""
    return mock.patch.object(TracedGraph, "_copyable_inplace", lambda self: set())


def _old_middle_layer_probe(tm: TorchModel, x: torch.Tensor) -> bool:
    """The check the incremental path once had: perturb the middle layer only and compare outputs.
    True when it would have let the incremental path through."""
    names = [info.name for info in tm.layers()]
    probe = names[len(names) // 2]
    with _unguarded(), tm.no_inplace(), torch.no_grad():
        graph = TracedGraph(tm.module, names)
        env = graph.forward_all(x)
        w = tm.modules[probe].weight
        saved = w.data
        w.data = saved + 0.05 * saved.abs().mean() * torch.sign(saved)
        try:
            y_inc, _ = graph.rerun_from(env, probe, x)
            y_full = tm.module(x)
        finally:
            w.data = saved
    return torch.allclose(y_inc, y_full, rtol=1e-5, atol=1e-6)


def test_every_layer_check_catches_what_the_middle_layer_probe_missed():
    task = _task()
    x = torch.from_numpy(task.eval_inputs[:2])
    first, last = _prepared(factories.inplace_after_use(), task), _prepared(factories.inplace_after_last(), task)
    assert not _old_middle_layer_probe(first, x)  # fc2 reads fc1's stale output: caught
    assert _old_middle_layer_probe(last, x)  # recomputing from fc2 redoes the in-place op on a fresh tensor: missed
    with _unguarded():
        recompute, reason = last.incremental(x)  # without the graph's own refusal, perturbing every layer finds it
        assert recompute is None and "after layer 'out'" in reason
        graph = TracedGraph(last.module, ["fc1", "fc2", "out"])
        with last.evaluating():
            env = graph.forward_all(x)
            with last.quantized({"out": "int4"}):
                y_inc, _ = graph.rerun_from(env, "out", x)
                y_full = last.module(x)
    assert not torch.allclose(y_inc, y_full)  # what the old probe let through measured another model


def test_residual_add_in_place_stays_incremental_and_equals_full_forward_exactly(tmp_path):
    """``out += identity`` with a layer on the identity branch: the add writes into a copy, so cached values hold."""
    from analysis import analyze

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", inputs=rng.normal(size=(160, 64)).astype(np.float32), labels=rng.integers(0, 10, 160))
    args = dict(progress=False, latency=False, verify_policies=0)
    inc = analyze("factories:inplace_residual", str(tmp_path / "x.npz"), tmp_path / "inc", **args)
    full = analyze("factories:inplace_residual", str(tmp_path / "x.npz"), tmp_path / "full", incremental=False, **args)
    assert inc.meta["sweep"]["path"] == INCREMENTAL and full.meta["sweep"]["path"] == FULL_FORWARD
    assert set(inc.layers.name) == {"fc1", "down", "fc2", "out"} and inc.layers.reaches_output.all()
    pd.testing.assert_frame_equal(inc.sensitivity, full.sensitivity, check_exact=True)
    pd.testing.assert_frame_equal(inc.policies, full.policies, check_exact=True)


@pytest.mark.parametrize("factory", [factories.dead_branch, lambda: factories.Untraceable()])
def test_layer_that_does_not_reach_the_output_is_flagged(factory):
    task = _task()
    module = factory()
    tm = _prepared(module, task)
    names = [i.name for i in tm.layers()]
    res = run_sweep(tm, task, "accuracy", [(n, "int4") for n in names], {}, incremental=True)
    expected = {n: n != "unused" for n in names}
    assert res.reaches_output == expected
    if "unused" in names:
        assert res.jobs[("unused", "int4")].state.result()["kl"] == 0.0


def test_layer_bytes_exact():
    info = LayerInfo("l", "Linear", 0, (64, 256), True, 64 * 256 + 64, 64 * 256, 256, 64)
    assert layer_bytes(info, FP32) == (64 * 256 + 64) * 4
    # int8: codes + per-channel fp32 scales + the per-channel zero points onnxruntime stores (all 0) + the
    # (int32) bias + input and output scale and zero point (QLinear kernels requantize their output)
    assert layer_bytes(info, INT8) == 64 * 256 + 64 * 4 + 64 + 64 * 4 + 2 * (4 + 1) == 16970
    # int4: packed codes + fp32 scale per group + packed 4-bit zero point per group + fp32 bias
    groups = 64 * 256 // 32
    assert layer_bytes(info, INT4) == 64 * 256 // 2 + groups * 4 + groups // 2 + 64 * 4


def test_unknown_format_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown format 'int3'; known: fp32, int4, int8"):
        get_format("int3")


def test_models_with_batchnorm_hash_and_keep_the_hash_of_other_tensors():
    from torch import nn

    from analysis.models.torch_model import state_sha256

    bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # num_batches_tracked is a 0-d int64 buffer
    assert len(state_sha256(bn)) == 64
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(6.0).reshape(2, 3))
        lin.bias.zero_()
    # the same digest as before 0-d tensors were handled, so Runs made earlier still match their models
    assert state_sha256(lin) == "abdbbfb5aa0ea07e62081784ecac79068bdd715200bd2f12adacca9c83e02e86"


def _layer_jobs(tm):
    from analysis.engine.sweep import plan_jobs

    return plan_jobs({}, [(l.name, f) for l in tm.layers() for f in ("int8", "int4")], {"all-int8": {
        l.name: "int8" for l in tm.layers()}})


@pytest.mark.parametrize("order", ["plan", "reversed"])
def test_chunks_in_any_order_measure_what_one_chunk_and_the_full_forward_measure(order):
    """Later chunks resume the FP32 forward where the previous one stopped; a chunk with an earlier layer
    starts it over. Either way every number equals one chunk's and the full-forward path's exactly."""
    from analysis.engine.executors import chunked
    from analysis.engine.sweep import SweepRunner

    task = _task(n=80)
    tm = _prepared(factories.ResidualMLP(width=64, blocks=6), task)
    jobs = _layer_jobs(tm)
    chunks = chunked(jobs, 5)
    runner = SweepRunner(tm, task, "accuracy")
    assert runner.path == INCREMENTAL
    by_chunks = {r["key"]: r for c in (chunks if order == "plan" else chunks[::-1]) for r in runner.run(c)}
    one = {r["key"]: r for r in SweepRunner(tm, task, "accuracy").run(jobs)}
    full = {r["key"]: r for r in SweepRunner(tm, task, "accuracy", incremental=False).run(jobs)}
    assert tm._weight_cache == {}  # fake-quantized weights are dropped after each chunk
    for j in jobs:
        for other in (one, full):
            assert by_chunks[j.key]["result"] == other[j.key]["result"], j
            assert (by_chunks[j.key]["signal"], by_chunks[j.key]["noise"]) == (other[j.key]["signal"], other[j.key]["noise"])


def test_chunks_in_plan_order_run_the_fp32_forward_about_twice_per_batch_not_once_per_chunk():
    """Each batch: one forward for the FP32 output (kept for later chunks), and one forward that the jobs'
    chunks share, each chunk resuming where the previous one stopped."""
    from analysis.engine.executors import chunked
    from analysis.engine.sweep import SweepRunner
    from analysis.models.torch_graph import BatchValues

    task = _task(n=80)
    tm = _prepared(factories.ResidualMLP(width=64, blocks=6), task)
    runner = SweepRunner(tm, task, "accuracy")
    computed = {"output": 0, "jobs": 0}
    advance = BatchValues.advance

    def counting(self, stop):
        computed["jobs" if self.pins else "output"] += max(0, stop - self.pos + 1)
        advance(self, stop)

    chunks = chunked(_layer_jobs(tm), 4)
    with mock.patch.object(BatchValues, "advance", counting):
        for c in chunks:
            runner.run(c)
    n_batches, n_nodes = -(-len(task.eval_inputs) // task.batch_size), len(runner.recompute.graph.nodes)
    assert len(chunks) > 4
    assert computed["output"] == n_batches * n_nodes
    assert n_batches * n_nodes * 0.8 < computed["jobs"] <= n_batches * n_nodes


@pytest.mark.parametrize("blocks", [4, 16])
def test_values_held_per_batch_do_not_grow_with_depth(blocks):
    """The FP32 values a batch holds while its jobs run (one chunk of every job) stay those of about one
    block, however deep the model (``forward_all`` keeps every node's value)."""
    from analysis.engine.sweep import SweepRunner
    from analysis.models.torch_graph import UNSET, BatchValues

    task = _task(n=56)
    tm = _prepared(factories.ResidualMLP(width=64, blocks=blocks), task)
    runner = SweepRunner(tm, task, "accuracy")
    held = []
    done = BatchValues.done

    def counting(self, name):
        held.append(sum(1 for v in self.values if v is not UNSET))
        done(self, name)

    with mock.patch.object(BatchValues, "done", counting):
        runner.run(_layer_jobs(tm))
    n_nodes = len(runner.recompute.graph.nodes)
    assert n_nodes > 4 * blocks and max(held) <= 6, (max(held), n_nodes)


def test_a_late_node_no_layer_feeds_does_not_drag_the_fp32_forward_to_the_end():
    """MiniLM's pooling divides by the mask's row sums, placed after the encoder in the graph: read by
    every job's recomputation, it is computed when read, so a chunk of first-block jobs runs the FP32
    forward through its own block only, and every number still equals the full-forward path's."""
    from analysis.data.minilm import MiniLMEmbedder
    from analysis.engine.executors import chunked
    from analysis.engine.sweep import SweepRunner
    from analysis.models.torch_graph import BatchValues

    torch.manual_seed(0)
    module = MiniLMEmbedder({"vocab_size": 50, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                             "num_hidden_layers": 3}).eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, size=(72, 12))
    for row, n in zip(ids, rng.integers(3, 12, 72)):
        row[n:] = 0
    task = Task("ids", "test", ids[:24], ids[24:], None, metric="embedding", batch_size=16, pad_id=0)
    tm = TorchModel(module, torch.from_numpy(ids[:2]), name="m", source="test")
    calibrate(tm, collect_activation_stats(tm, task.calib_batches), [INT8, INT4])
    runner = SweepRunner(tm, task, "embedding")
    graph = runner.recompute.graph
    block1 = min(graph.index[n] for n in graph.nodes if n.name.startswith("encoder_layer_1"))
    assert graph.need["encoder.layer.0.attention.self.query"] < block1
    reached = []
    advance = BatchValues.advance

    def recording(self, stop):
        advance(self, stop)
        if self.pins:
            reached.append(self.pos)

    jobs = _layer_jobs(tm)
    with mock.patch.object(BatchValues, "advance", recording):
        first = runner.run(jobs[:4])  # query, key of the first block at int8 and int4
    assert max(reached) <= block1
    rest = [r for c in chunked(jobs[4:], 6) for r in runner.run(c)]
    full = {r["key"]: r for r in SweepRunner(tm, task, "embedding", incremental=False).run(jobs)}
    for r in first + rest:
        assert (r["result"], r["signal"], r["noise"]) == (full[r["key"]]["result"], full[r["key"]]["signal"],
                                                          full[r["key"]]["noise"]), r["layer"]


def test_only_single_layer_weights_are_kept_between_calls():
    """A job's fake-quantized weight is reused on every batch of its chunk; a whole-model policy makes its
    own for the block, so never more than one model's worth is held."""
    task = _task()
    tm = _prepared(factories.tiny_mlp(), task)
    x = torch.from_numpy(task.eval_inputs[:4])
    with torch.no_grad():
        with tm.quantized({"fc1": "int8", "fc2": "int4", "out": "int8"}):
            assert tm._weight_cache == {}
            y_policy = tm.module(x)
        with tm.quantized({"fc2": "int4"}):
            tm.module(x)
        assert set(tm._weight_cache) == {("fc2", "int4")}
        tm.release_fake_weights()
        assert tm._weight_cache == {}
        with tm.quantized({"fc1": "int8", "fc2": "int4", "out": "int8"}):
            assert torch.equal(tm.module(x), y_policy)
