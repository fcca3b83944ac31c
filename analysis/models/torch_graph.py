"""Incremental re-execution of a traced torch model.

The FP32 forward of a batch runs once and keeps every intermediate value; a job that
perturbs one layer then recomputes only the nodes downstream of it (residual branches
included, because the traced graph says who uses what). Models that ``torch.fx`` cannot
trace fall back to a full forward per job; the Run records which path was taken.

Cached values are shared between jobs, so an in-place operation (``out += identity``,
``x.mul_(0.5)``) would corrupt them. Where only the operation's result is read afterwards
(``out += identity`` rebinds ``out``), the node writes into a copy, in the first forward and
in every recomputation; where the modified tensor itself is read again later, the graph
refuses to trace (``InplaceError``) and the sweep takes the full-forward path.
"""
from __future__ import annotations

import operator

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

    def reaches_output(self, name: str) -> bool:
        return self.index[self.output_node] in self.downstream[name]

    def _run_node(self, i: int, env: list, x: torch.Tensor):
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

    def rerun_from(self, env: list, name: str, x: torch.Tensor) -> tuple[object, torch.Tensor]:
        """Recompute what lies downstream of layer ``name`` (the caller has applied its
        perturbation to the module); returns the output and the layer's own new output."""
        local = list(env)
        for i in self.downstream[name]:
            local[i] = self._run_node(i, local, x)
        return local[self.index[self.output_node]], local[self.index[self.layer_node[name]]]

    def layer_output(self, env: list, name: str) -> torch.Tensor:
        return env[self.index[self.layer_node[name]]]

    def cost(self, name: str) -> float:
        """Share of the graph's nodes that a job on layer ``name`` recomputes."""
        return len(self.downstream[name]) / len(self.nodes)
