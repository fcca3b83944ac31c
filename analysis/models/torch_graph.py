"""Incremental re-execution of a traced torch model.

The FP32 forward of a batch runs once and keeps every intermediate value; a job that
perturbs one layer then recomputes only the nodes downstream of it (residual branches
included, because the traced graph says who uses what). Models that ``torch.fx`` cannot
trace fall back to a full forward per job; the Run records which path was taken.
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.fx.node import map_arg


class TracedGraph:
    """A traced module and, per layer, the nodes whose values depend on that layer."""

    def __init__(self, module: nn.Module, layer_names: list[str]) -> None:
        self.gm = fx.symbolic_trace(module)
        self.nodes = list(self.gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.submodules = dict(self.gm.named_modules())
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

    def _run_node(self, node: fx.Node, env: list, x: torch.Tensor):
        if node.op == "placeholder":
            return x
        args, kwargs = map_arg((node.args, node.kwargs), lambda n: env[self.index[n]])
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
        for i, node in enumerate(self.nodes):
            env[i] = self._run_node(node, env, x)
        return env

    def rerun_from(self, env: list, name: str, x: torch.Tensor) -> tuple[object, torch.Tensor]:
        """Recompute what lies downstream of layer ``name`` (the caller has applied its
        perturbation to the module); returns the output and the layer's own new output."""
        local = list(env)
        for i in self.downstream[name]:
            local[i] = self._run_node(self.nodes[i], local, x)
        return local[self.index[self.output_node]], local[self.index[self.layer_node[name]]]

    def layer_output(self, env: list, name: str) -> torch.Tensor:
        return env[self.index[self.layer_node[name]]]
