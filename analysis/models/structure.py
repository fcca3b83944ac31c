"""Which analysed layers feed each layer: the dataflow between layers, drawn by the dashboard's Model view.

A layer is *fed by* the layers whose outputs reach its input through operations that are not layers
(add, LayerNorm, ReLU, reshape, attention's matmuls and softmax ...). Where several branches meet (a
residual add, attention's q/k/v), each branch counts with its *latest* layers only: a branch that is
itself a sum (the residual stream) is reduced to its members that no other member depends on. So a
transformer block's ``intermediate.dense`` is fed by ``attention.output.dense`` and the previous block's
``output.dense`` (the skip), not by every layer the residual stream ever added in; a ResNet block's next
conv by the block's last conv and the skip (or its downsample conv).

The graph comes from where the model keeps it: ``torch.fx`` for torch modules, the node list for ONNX.
A model whose graph cannot be read gets no dataflow (``Structure.fed_by is None``) and says why; the view
then draws execution order grouped by the layers' names.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

FX, ONNX, NAMES = "torch.fx graph", "ONNX graph", "name hierarchy"
SHAPE_METHODS = {"size", "dim", "numel", "type", "get_device"}  # tensor metadata, not its values
SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
SHAPE_OPS = {"Shape", "Size"}  # ONNX nodes that read a tensor's shape only


@dataclass(frozen=True)
class Structure:
    """Per layer, the layers that feed it (execution order), or None when the graph could not be read."""

    fed_by: dict[str, list[str]] | None
    source: str  # FX, ONNX, or NAMES (no dataflow)
    reason: str = ""  # why there is no dataflow

    def to_meta(self) -> dict:
        return {"source": self.source, "reason": self.reason} if self.reason else {"source": self.source}


def without_dataflow(reason: str) -> Structure:
    return Structure(None, NAMES, reason)


def _reduce(members: frozenset[int], ancestors: list[int]) -> frozenset[int]:
    """``members`` minus those another member depends on (``ancestors[m]``: bit set of m's upstream layers)."""
    if len(members) < 2:
        return members
    upstream = 0
    for m in members:
        upstream |= ancestors[m]
    return frozenset(m for m in members if not upstream >> m & 1)


def layer_dataflow(steps: Iterable[tuple[str | None, Iterable, Iterable, bool]],
                   layers: list[str]) -> dict[str, list[str]]:
    """Who feeds each layer, from a graph's steps in topological order.

    Args:
        steps: ``(layer name or None, values read, values written, carries)`` per graph node; ``carries`` is
            False for nodes that read only their inputs' shape. A layer's weights are not values read.
        layers: the analysed layers in execution order (a step naming another name is an ordinary op).

    Returns:
        ``{layer: [layers feeding it, in execution order]}``; a layer fed by no layer (the first) maps to [].
    """
    index = {n: i for i, n in enumerate(layers)}
    empty: frozenset[int] = frozenset()
    raw: dict = {}  # value -> layers meeting at its last merge (each branch reduced)
    red: dict = {}  # value -> the same set, reduced: what it counts as when it meets another branch
    ancestors = [0] * len(layers)  # per layer: bit set of every layer upstream of it
    fed: dict[int, frozenset[int]] = {}
    for layer, reads, writes, carries in steps:
        ins = [r for r in dict.fromkeys(reads) if red.get(r)] if carries else []
        if len(ins) == 1:
            r_raw, r_red = raw[ins[0]], red[ins[0]]
        elif ins:
            r_raw = frozenset().union(*(red[r] for r in ins))
            r_red = _reduce(r_raw, ancestors)
        else:
            r_raw = r_red = empty
        i = index.get(layer) if layer is not None else None
        if i is not None:
            feeders = r_raw - {i}  # a module called twice in a row does not feed itself
            fed[i] = fed.get(i, empty) | feeders
            up = ancestors[i]
            for m in feeders:
                up |= ancestors[m] | (1 << m)
            ancestors[i] = up & ~(1 << i)
            r_raw = r_red = frozenset((i,))
        for w in writes:
            raw[w], red[w] = r_raw, r_red
    return {n: [layers[m] for m in sorted(fed.get(i, empty))] for i, n in enumerate(layers)}


def _trace_to_layers(module, layers: list[str]):
    """``torch.fx`` trace that enters every module holding an analysed layer, ``torch.nn`` blocks included
    (plain ``symbolic_trace`` keeps ``nn.TransformerEncoderLayer`` and the like whole, hiding their Linear
    layers), and keeps the analysed layers themselves whole: the ``call_module`` nodes the engine's
    ``TracedGraph`` also needs. Other modules are traced as ``symbolic_trace`` does. The attention fast path
    is off while tracing: its checks branch on the input (untraceable) and compute what the plain path does."""
    import torch
    from torch import fx

    wanted = set(layers)
    holders = {name.rsplit(".", k)[0] for name in layers for k in range(1, name.count(".") + 1)}

    class LayerTracer(fx.Tracer):
        def is_leaf_module(self, m, qualified_name: str) -> bool:
            if qualified_name in wanted:
                return True
            if qualified_name in holders:
                return False
            return super().is_leaf_module(m, qualified_name)

    mha = torch.backends.mha
    fast = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        tracer = LayerTracer()
        graph = tracer.trace(module)
    finally:
        mha.set_fastpath_enabled(fast)
    name = module.__class__.__name__ if isinstance(module, torch.nn.Module) else module.__name__
    return fx.GraphModule(tracer.root, graph, name)


def fx_structure(module, layers: list[str]) -> Structure:
    """Dataflow of a torch module traced with ``torch.fx`` (layers are its ``call_module`` nodes)."""
    from torch import fx

    from analysis.models.torch_graph import mutates_first_argument

    try:
        gm = _trace_to_layers(module, layers)
    except Exception as e:  # fx raises many types on untraceable Python
        return without_dataflow(f"torch.fx cannot trace the model ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    wanted = set(layers)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in wanted}
    missing = [n for n in layers if n not in called]
    if missing:
        return without_dataflow(f"the traced graph does not call layer(s) {', '.join(missing[:3])} as modules")

    def carries(n) -> bool:
        if n.op == "call_method":
            return n.target not in SHAPE_METHODS
        if n.op == "call_function" and n.target is getattr:
            return not (len(n.args) > 1 and n.args[1] in SHAPE_ATTRS)
        return True

    def writes(n) -> tuple:
        # an in-place op (y.add_(b), y += b, x[i] = v, ReLU(inplace=True)) also changes its first argument:
        # later readers of that tensor see what the op read
        target = n.args[0] if n.args else None
        if isinstance(target, fx.Node) and mutates_first_argument(n, submodules):
            return n, target
        return (n,)

    submodules = dict(gm.named_modules())
    steps = ((n.target if n.op == "call_module" else None, n.all_input_nodes, writes(n), carries(n))
             for n in gm.graph.nodes)
    return Structure(layer_dataflow(steps, layers), FX)


def onnx_structure(model, layers: list[str]) -> Structure:
    """Dataflow of an ONNX graph (layers are node names; nodes are stored in topological order). Tensors that
    subgraphs (``If`` branches, ``Loop`` bodies) read from outside count as their node's inputs."""
    from analysis.models.onnx_graph import node_reads

    steps = ((node.name, node_reads(node), [o for o in node.output if o], node.op_type not in SHAPE_OPS)
             for node in model.graph.node)
    return Structure(layer_dataflow(steps, layers), ONNX)
