"""Incremental re-execution of a traced torch model.

The FP32 forward of a batch runs once; a job that perturbs one layer then recomputes only the
nodes downstream of it (residual branches included, because the traced graph says who uses
what). Models that ``torch.fx`` cannot trace fall back to a full forward per job; the Run
records which path was taken.

Memory does not grow with depth x batch: ``BatchValues`` computes the FP32 forward in graph
order only as far as the pending jobs need (jobs run in graph order) and drops each value once
no later node, no pending job and no carried cut reads it; a recomputation drops its own values
the same way. ``carry`` hands a later chunk of jobs on the same batch the few values live at the
chunk's last layer (for a transformer: the block's input, its q/k/v, the mask), so the next chunk
resumes the FP32 forward there instead of starting over.

Cached values are shared between jobs, so an in-place operation (``out += identity``,
``x.mul_(0.5)``) would corrupt them. Where only the operation's result is read afterwards
(``out += identity`` rebinds ``out``), the node writes into a copy, in the first forward and
in every recomputation; where the modified tensor itself is read again later, the graph
refuses to trace (``InplaceError``) and the sweep takes the full-forward path.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.node import map_arg

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
                      operator.irshift, operator.imatmul, operator.setitem}


def mutates_first_argument(node: fx.Node, submodules: dict[str, nn.Module]) -> bool:
    """Whether running ``node`` writes into its first argument (in-place tensor methods and operators,
    ``inplace=True`` functions and modules)."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_module":
        return getattr(submodules.get(node.target), "inplace", False) is True
    return False


class InplaceError(ValueError):
    """An in-place operation whose effect later nodes rely on: cached values cannot be reused."""


class TracedGraph:
    """A traced module and, per layer, the nodes whose values depend on that layer."""

    def __init__(self, module: nn.Module, layer_names: list[str]) -> None:
        self.gm = fx.symbolic_trace(module)
        self.nodes = list(self.gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.submodules = dict(self.gm.named_modules())
        self.inplace = self._copyable_inplace()
        wanted = set(layer_names)
        self.layer_node: dict[str, fx.Node] = {}
        for n in self.nodes:
            if n.op == "call_module" and n.target in wanted:
                if n.target in self.layer_node:
                    raise ValueError(f"layer {n.target} is called more than once")
                self.layer_node[n.target] = n
        missing = wanted - set(self.layer_node)
        if missing:
            raise ValueError(f"layers not found in the traced graph: {', '.join(sorted(missing))}")
        self.downstream = {name: self._downstream_of(node) for name, node in self.layer_node.items()}
        self.output_node = next(n for n in self.nodes if n.op == "output")
        self.out_index = self.index[self.output_node]
        # the last node that reads each value (-1: none), and per node the values it is the last reader of
        self.last_user = [max((self.index[u] for u in n.users), default=-1) for n in self.nodes]
        self.dies_at: list[list[int]] = [[] for _ in self.nodes]
        for k, last in enumerate(self.last_user):
            if last >= 0:
                self.dies_at[last].append(k)
        # nodes no layer feeds (the attention mask, a pooling denominator): computed when first read, so
        # one placed late in the graph does not drag the FP32 forward to the end for every job
        layer_nodes = set(self.layer_node.values())
        self.layer_free: list[bool] = []
        for n in self.nodes:
            self.layer_free.append(n not in layer_nodes and all(self.layer_free[self.index[a]] for a in n.all_input_nodes))
        # per layer: the FP32 values its recomputation reads (outside its downstream), and how far the
        # FP32 forward must have run before the job can start
        self.reads = {name: self._reads_of(ds) for name, ds in self.downstream.items()}
        self.need = {name: max([self.index[self.layer_node[name]], *(r for r in self.reads[name] if not self.layer_free[r])])
                     for name in self.downstream}
        self._live: dict[int, list[int]] = {}

    def _copyable_inplace(self) -> set[int]:
        """Indices of in-place nodes that may write into a copy: no later node reads the tensor they modify."""
        out = set()
        for node in self.nodes:
            if not mutates_first_argument(node, self.submodules):
                continue
            target = node.args[0] if node.args else None
            later = [u for u in getattr(target, "users", ()) if self.index[u] > self.index[node]]
            if not isinstance(target, fx.Node) or later or node.target is operator.setitem:
                raise InplaceError(f"in-place operation '{node.name}' modifies '{getattr(target, 'name', target)}', "
                                   f"which later nodes read")
            out.add(self.index[node])
        return out

    def _downstream_of(self, start: fx.Node) -> list[int]:
        seen, stack = {start}, [start]
        while stack:
            for user in stack.pop().users:
                if user not in seen:
                    seen.add(user)
                    stack.append(user)
        return sorted(self.index[n] for n in seen)

    def _reads_of(self, downstream: list[int]) -> list[int]:
        inside = set(downstream)
        return sorted({self.index[a] for i in downstream for a in self.nodes[i].all_input_nodes} - inside)

    def live_at(self, cut: int) -> list[int]:
        """Nodes before ``cut`` that a node at or after ``cut`` reads: all a computation from ``cut`` on needs."""
        if cut not in self._live:
            self._live[cut] = [k for k in range(cut) if self.last_user[k] >= cut]
        return self._live[cut]

    def reaches_output(self, name: str) -> bool:
        return self.out_index in self.downstream[name]

    def _run_node(self, i: int, env, x: torch.Tensor):
        node = self.nodes[i]
        if node.op == "placeholder":  # several inputs come as a dict by argument name
            if isinstance(x, dict):
                return x[node.target] if node.target in x else (node.args[0] if node.args else None)
            return x if i == 0 else (node.args[0] if node.args else None)  # one tensor: the first argument
        args, kwargs = map_arg((node.args, node.kwargs), lambda n: env[self.index[n]])
        if i in self.inplace and args and isinstance(args[0], torch.Tensor):
            args = (args[0].clone(), *args[1:])  # the cached value stays as the first forward left it
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            self_obj, *rest = args
            return getattr(self_obj, node.target)(*rest, **kwargs)
        if node.op == "call_module":
            return self.submodules[node.target](*args, **kwargs)
        if node.op == "output":
            return args[0]
        raise RuntimeError(f"unknown fx op {node.op}")

    def forward_all(self, x: torch.Tensor) -> list:
        """Every node's value for one batch (the last entry is the output)."""
        env: list = [None] * len(self.nodes)
        for i in range(len(self.nodes)):
            env[i] = self._run_node(i, env, x)
        return env

    def output(self, env: list):
        return env[self.index[self.output_node]]

    def rerun_from(self, env, name: str, x: torch.Tensor) -> tuple[object, torch.Tensor]:
        """Recompute what lies downstream of layer ``name`` (the caller has applied its
        perturbation to the module); returns the output and the layer's own new output.
        ``env`` (a list from ``forward_all``, or ``BatchValues``) is read, never written."""
        y, out = self.rerun_values(env, name, x)
        return (env[self.out_index] if y is UNSET else y), out

    def rerun_values(self, env, name: str, x: torch.Tensor) -> tuple[object, torch.Tensor]:
        """``rerun_from`` that returns ``UNSET`` as the output when the layer does not reach it; each
        recomputed value is dropped after its last reader."""
        new: dict[int, object] = {}
        layer_i = self.index[self.layer_node[name]]
        view = _Overlay(new, env)
        out = None
        for i in self.downstream[name]:
            new[i] = self._run_node(i, view, x)
            if i == layer_i:
                out = new[i]
            for k in self.dies_at[i]:
                new.pop(k, None)
        return new.get(self.out_index, UNSET), out

    def layer_output(self, env: list, name: str) -> torch.Tensor:
        return env[self.index[self.layer_node[name]]]

    def cost(self, name: str) -> float:
        """Share of the graph's nodes that a job on layer ``name`` recomputes."""
        return len(self.downstream[name]) / len(self.nodes)


UNSET = object()  # a value not computed yet, or dropped


class _Overlay:
    """Recomputed values first, the FP32 values under them."""

    __slots__ = ("new", "env")

    def __init__(self, new: dict, env) -> None:
        self.new, self.env = new, env

    def __getitem__(self, k: int):
        v = self.new.get(k, UNSET)
        return self.env[k] if v is UNSET else v


@dataclass
class Carried:
    """What a batch's next chunk of jobs resumes from: node ``cut``'s FP32 value and those live there
    (``live_at``), so the forward goes on at ``cut + 1``; and the FP32 output when it was small enough
    to keep (else None)."""

    cut: int
    values: dict[int, object]
    output: object = None


class BatchValues:
    """One batch's FP32 node values, computed in graph order only as far as the pending jobs need, each
    dropped once no later node, no pending job and the carried cut read it.

    ``layers`` are the layers of the chunk's jobs, in the order they run (one entry per job); ``carried``
    is a previous chunk's ``carry()`` on the same batch, used when no layer lies before its cut."""

    def __init__(self, graph: TracedGraph, x, layers: list[str], carried: Carried | None = None) -> None:
        self.g, self.x = graph, x
        self.values: list = [UNSET] * len(graph.nodes)
        self.pins: Counter = Counter()
        for name in layers:
            self.pins.update([graph.index[graph.layer_node[name]], *graph.reads[name]])
        starts = [graph.index[graph.layer_node[n]] for n in layers]
        self.pos, self.output, self.canon = 0, None, None  # canon: the output as the adapter compares it
        if carried is not None:
            self.output = carried.output
            if carried.cut in carried.values and all(s >= carried.cut for s in starts):
                for k, v in carried.values.items():
                    self.values[k] = v
                self.pos = carried.cut + 1
        self.cut = max(starts, default=max(self.pos - 1, 0))
        self.keep = {*graph.live_at(self.cut), self.cut, graph.out_index}

    def __getitem__(self, k: int):
        v = self.values[k]
        if v is UNSET:
            if not self.g.layer_free[k]:
                raise RuntimeError(f"value of node '{self.g.nodes[k].name}' was read after it was dropped or before "
                                   f"it was computed")
            v = self.values[k] = self.g._run_node(k, self, self.x)  # reads its own inputs through here
        return v

    def advance(self, stop: int) -> None:
        """Compute the FP32 values of nodes up to ``stop`` (inclusive)."""
        g = self.g
        while self.pos <= stop:
            i = self.pos
            if self.values[i] is UNSET:  # a layer-free node may have been read (so computed) already
                self.values[i] = g._run_node(i, self, self.x)
            self.pos = i + 1
            self._drop(g.dies_at[i])
            if g.last_user[i] < 0:
                self._drop([i])

    def fp32_output(self):
        """The FP32 output (runs the forward to the end unless a previous chunk kept it)."""
        if self.output is None:
            self.advance(len(self.g.nodes) - 1)
            self.output = self.values[self.g.out_index]
        return self.output

    def ready(self, name: str) -> None:
        """Run the FP32 forward far enough for a job on layer ``name``."""
        self.advance(self.g.need[name])

    def done(self, name: str) -> None:
        """A job on layer ``name`` has finished: what only it read is dropped."""
        g = self.g
        ks = [g.index[g.layer_node[name]], *g.reads[name]]
        self.pins.subtract(ks)
        self._drop(ks)

    def _drop(self, ks) -> None:
        for k in ks:
            if self.pins[k] <= 0 and k not in self.keep and self.g.last_user[k] < self.pos:
                self.values[k] = UNSET

    def carry(self, keep_output: bool) -> Carried:
        """What the next chunk on this batch resumes from: this chunk's last layer's FP32 output and the
        values live there (none when the forward never reached it)."""
        ks = [*self.g.live_at(self.cut), self.cut]
        values = {k: self.values[k] for k in ks if self.values[k] is not UNSET}
        return Carried(self.cut, values if len(values) == len(ks) else {}, self.output if keep_output else None)
