"""A node-by-node interpreter of a traced graph that runs the float and the partially quantized model side by
side over data chunks (GPFQ's layer-by-layer calibration: each layer's input on both paths, with every node
executed once per path and tensors freed after their last use)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import fx


class SideBySide:
    """Runs the traced graph node by node on two module sets (float, quantized) over data chunks.

    Args:
        graph_module: the BN-folded float GraphModule (its graph is interpreted for both paths).
        quant_root: the module holding the quantized path's submodules (same names).
        chunks: input chunks.
    """

    def __init__(self, graph_module: fx.GraphModule, quant_root: nn.Module, chunks: list[torch.Tensor]):
        self.nodes = [n for n in graph_module.graph.nodes]
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.roots = (graph_module, quant_root)
        last = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a] = i
        self.free_at: dict[int, list[fx.Node]] = {}
        for n, i in last.items():
            self.free_at.setdefault(i, []).append(n)
        self.chunks = chunks
        self.envs = [({}, {}) for _ in chunks]
        self.pos = 0

    def _attr(self, root: nn.Module, target: str):
        obj = root
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _exec(self, node: fx.Node, env: dict, path: int, chunk: torch.Tensor):
        root = self.roots[path]
        load = lambda a: fx.node.map_arg(a, lambda n: env[n])  # noqa: E731
        if node.op == "placeholder":
            return chunk
        if node.op == "get_attr":
            return self._attr(root, node.target)
        args, kwargs = load(node.args), load(node.kwargs)
        if node.op == "call_module":
            return root.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return None  # output

    def run_node(self, i: int, c: int) -> tuple:
        """Execute node ``i`` on both paths of chunk ``c``; returns the two values (kept in the envs)."""
        node = self.nodes[i]
        outs = []
        for path in (0, 1):
            env = self.envs[c][path]
            val = self._exec(node, env, path, self.chunks[c])
            if node.op != "output":
                env[node] = val
            outs.append(val)
        return tuple(outs)

    def free(self, i: int, c: int) -> None:
        for n in self.free_at.get(i, ()):
            for env in self.envs[c]:
                env.pop(n, None)

    def run_until(self, stop: int, c: int) -> None:
        """Execute nodes from the current position up to (not including) ``stop`` for chunk ``c``."""
        for i in range(self.pos, stop):
            self.run_node(i, c)
            self.free(i, c)

    def inputs_of(self, i: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first tensor argument of node ``i`` on both paths of chunk ``c``."""
        a = self.nodes[i].args[0]
        return self.envs[c][0][a], self.envs[c][1][a]
