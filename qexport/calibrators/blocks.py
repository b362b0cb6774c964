"""Reconstruction blocks found from the traced graph (no class names): residual blocks and single layers.

The QuantSim's graph is walked in order; after each node the set of tensors still needed later is computed.
Where that set is a single tensor, the graph can be cut: everything after it depends on nothing before it
except that tensor. A residual block is the stretch between two cuts that holds a residual Add (two tensors
are live inside it: the branch and the shortcut), so torchvision's BasicBlock/Bottleneck, the CIFAR ResNets'
option-A blocks and MobileNetV2's inverted residuals all come out as blocks, and plain layers come out one
by one. Stretches without a quantized layer (an activation quantizer, a pooling, a flatten) join the next
block, so each block owns the quantizer of its own input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import fx

from qexport.errors import QexportError
from qexport.quant import graph_ops


@dataclass
class Block:
    """A stretch of the graph between two cuts.

    Attributes:
        name: readable name (its first and last quantized layer).
        nodes: the graph nodes, in order.
        input: the node whose value enters the block (a placeholder or the previous block's output).
        output: the node whose value leaves it.
        layers: module names of the quantized layers in it.
        residual: it holds a residual Add.
    """

    name: str
    nodes: list[fx.Node]
    input: fx.Node
    output: fx.Node
    layers: tuple[str, ...]
    residual: bool


def _cut_points(nodes: list[fx.Node]) -> list[int]:
    """Indices i such that after node i exactly one tensor is still needed by later nodes."""
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a.op != "get_attr":
                last_use[a] = pos[n]
    cuts, live = [], set()
    for i, n in enumerate(nodes):
        if n.op == "output":
            break
        if n.op != "get_attr" and last_use.get(n, -1) > i:
            live.add(n)
        live = {m for m in live if last_use[m] > i}
        if len(live) == 1 and next(iter(live)) is n:
            cuts.append(i)
    return cuts


def find_blocks(gm: fx.GraphModule, layer_names: set[str]) -> list[Block]:
    """Split a QuantSim graph into reconstruction blocks.

    Args:
        gm: the QuantSim's GraphModule (quantizer nodes included).
        layer_names: module names of the quantized layers.

    Returns:
        The blocks in graph order; together they hold every node between the input and the output.
    """
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise QexportError(f"brecq reconstructs models with one input tensor; this one has {len(inputs)}")
    out = next(n for n in nodes if n.op == "output")
    if not isinstance(out.args[0], fx.Node):
        raise QexportError("brecq reconstructs models with one output tensor; this one returns a tuple or dict")
    seen: dict[str, int] = {}
    for n in nodes:
        if n.op == "call_module" and n.target in layer_names:
            seen[n.target] = seen.get(n.target, 0) + 1
    shared = sorted(k for k, v in seen.items() if v > 1)
    if shared:
        raise QexportError(f"layer {shared[0]!r} is called more than once in the graph; brecq cannot reconstruct "
                           "a shared layer block by block (use --method mse or gpfq, or --keep-float it)")
    cuts = [c for c in _cut_points(nodes) if nodes[c].op != "placeholder"]
    end = nodes.index(out)
    if not cuts or cuts[-1] != end - 1:
        cuts.append(end - 1)
    stretches, start = [], 1 + nodes.index(inputs[0])
    for c in cuts:
        if c >= start:
            stretches.append((start, c))
            start = c + 1
    blocks: list[Block] = []
    pending_start = None
    prev_out = inputs[0]
    for s, e in stretches:
        seg = nodes[s : e + 1]
        layers = tuple(n.target for n in seg if n.op == "call_module" and n.target in layer_names)
        if not layers and pending_start is None and blocks and all(_pointwise(gm, n) for n in seg):
            last = blocks[-1]  # an activation function after a block's last layer: part of that block's output
            blocks[-1] = _make_block(gm, last.nodes + seg, last.input, last.layers)
            prev_out = nodes[e]
            continue
        first = s if pending_start is None else pending_start
        if not layers:
            pending_start = first
            continue
        blocks.append(_make_block(gm, nodes[first : e + 1], prev_out, layers))
        prev_out, pending_start = nodes[e], None
    if not blocks:
        raise QexportError("brecq found no quantized layer to reconstruct")
    if pending_start is not None:  # trailing nodes without a layer join the last block
        last = blocks[-1]
        blocks[-1] = _make_block(gm, last.nodes + nodes[pending_start:end], last.input, last.layers)
    return blocks


def _pointwise(gm: fx.GraphModule, n: fx.Node) -> bool:
    """An element-wise op that is neither an activation quantizer, nor data movement, nor an average."""
    if n.op == "call_module" and str(n.target).startswith("qx_"):
        return False
    return n.op != "get_attr" and not graph_ops.is_data_movement(gm, n) and not graph_ops.is_average(gm, n)


def _make_block(gm: fx.GraphModule, seg: list[fx.Node], inp: fx.Node, layers: tuple[str, ...]) -> Block:
    residual = any(graph_ops.is_residual_add(n) for n in seg)
    name = layers[0] if len(layers) == 1 else f"{layers[0]}..{layers[-1]}"
    return Block(name, seg, inp, seg[-1], layers, residual)


def block_module(gm: nn.Module, block: Block, float_path: bool = False) -> fx.GraphModule:
    """A GraphModule computing ``block.output`` from ``block.input``; it shares gm's submodules (and parameters).

    Args:
        gm: the module whose submodules the block calls: the QuantSim's graph module, or (``float_path``) the
            BN-folded float model, whose layers have the same names.
        block: the block.
        float_path: skip the activation quantizer nodes (the float model has none).

    Returns:
        The block as a callable module ``f(x) -> y``.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {block.input: graph.placeholder("x")}

    def arg(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":
                raise QexportError(f"brecq cannot handle block {block.name!r}: node {n.name!r} reaches into it "
                                   "from outside its input (use --method mse or gpfq for this model)")
            env[n] = graph.node_copy(n, arg)
        return env[n]

    for n in block.nodes:
        if float_path and n.op == "call_module" and str(n.target).startswith("qx_"):
            env[n] = arg(n.args[0])
        else:
            env[n] = graph.node_copy(n, arg)
    graph.output(env[block.output])
    return fx.GraphModule(gm, graph)


def layer_macs(gm: torch.nn.Module, example: torch.Tensor, layer_names: set[str]) -> dict[str, float]:
    """Multiply-accumulates per image of each quantized layer (the cost model of the time budget split).

    Args:
        gm: the model.
        example: one input batch.
        layer_names: module names to count.

    Returns:
        name -> MACs per image.
    """
    macs: dict[str, float] = {}
    hooks = []
    for name in layer_names:
        mod = gm.get_submodule(name)

        def hook(m, inp, out, name=name):
            per_out = m.weight[0].numel() if isinstance(m, torch.nn.Conv2d) else m.in_features
            macs[name] = float(out[0].numel() * per_out)

        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            gm(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return macs
