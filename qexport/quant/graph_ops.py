"""Classify torch.fx nodes: quantizable layers, residual adds, data movement, non-negative producers.

Works on graphs from ``torch.fx.symbolic_trace`` (modules, torch functions, tensor methods) and on
``torch.export`` graphs converted to modules (aten call_functions).
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

QUANTIZABLE_MODULES = (nn.Conv2d, nn.Linear)
# Weighted layers qexport cannot quantize yet: an error names them unless the user keeps them in float.
UNSUPPORTED_WEIGHTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                        nn.Embedding, nn.EmbeddingBag, nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention, nn.Bilinear)

_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCS = {F.relu, torch.relu, F.relu6, aten.relu.default, aten.relu_.default, aten.hardtanh.default,
               aten.relu6.default}
_MOVE_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity, nn.ZeroPad2d)
_MOVE_FUNCS = {torch.flatten, F.max_pool2d, F.dropout, operator.getitem, F.pad, torch.reshape,
               aten.max_pool2d.default, aten.flatten.using_ints, aten.view.default, aten.reshape.default,
               aten.slice.Tensor, aten.constant_pad_nd.default, aten.dropout.default, aten.clone.default,
               aten.contiguous.default}
_MOVE_METHODS = {"view", "reshape", "flatten", "contiguous", "permute", "transpose", "__getitem__"}
_POOL_MODULES = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_POOL_FUNCS = {F.adaptive_avg_pool2d, F.avg_pool2d, torch.mean, aten.mean.dim, aten.adaptive_avg_pool2d.default,
               aten.avg_pool2d.default, aten._adaptive_avg_pool2d.default}
_ADD_FUNCS = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor}


def target_module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def is_quantizable_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for a call of nn.Conv2d or nn.Linear (the layers qexport quantizes)."""
    return isinstance(target_module(gm, node), QUANTIZABLE_MODULES)


def is_unsupported_weighted(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for weighted layers the exporter cannot quantize (Conv3d, ConvTranspose, RNNs, ...)."""
    return isinstance(target_module(gm, node), UNSUPPORTED_WEIGHTED)


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for ReLU/ReLU6 (module, function or method); hardtanh only with min_val >= 0."""
    mod = target_module(gm, node)
    if isinstance(mod, _RELU_MODULES):
        return True
    if isinstance(mod, nn.Hardtanh):
        return mod.min_val >= 0
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        if node.target is aten.hardtanh.default:
            return len(node.args) > 1 and node.args[1] >= 0
        return True
    return node.op == "call_method" and node.target in ("relu", "relu_")


def is_data_movement(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that only move or select values (quantization commutes with them exactly)."""
    mod = target_module(gm, node)
    if mod is not None:
        return isinstance(mod, _MOVE_MODULES)
    if node.op == "call_function":
        if node.target is F.pad:
            return node.kwargs.get("value") in (None, 0, 0.0) and node.kwargs.get("mode", "constant") == "constant"
        return node.target in _MOVE_FUNCS
    return node.op == "call_method" and node.target in _MOVE_METHODS


def is_average(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Average pooling / mean: keeps non-negativity but not the quantization grid."""
    mod = target_module(gm, node)
    if mod is not None:
        return isinstance(mod, _POOL_MODULES)
    if node.op == "call_function":
        return node.target in _POOL_FUNCS
    return node.op == "call_method" and node.target == "mean"


def is_residual_add(node: fx.Node) -> bool:
    """An elementwise add of two graph tensors (a residual join)."""
    if node.op == "call_function" and node.target in _ADD_FUNCS:
        args = node.args[:2]
    elif node.op == "call_method" and node.target in ("add", "add_"):
        args = node.args[:2]
    else:
        return False
    return len(args) == 2 and all(isinstance(a, fx.Node) for a in args)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The graph-node arguments of ``node`` (positional, then keyword)."""
    nodes = [a for a in node.args if isinstance(a, fx.Node)]
    nodes += [a for a in node.kwargs.values() if isinstance(a, fx.Node)]
    return nodes


def non_negative_nodes(gm: fx.GraphModule) -> set[str]:
    """Names of nodes whose output is provably >= 0 (ReLU outputs, and moves/pools/adds of such).

    Args:
        gm: the traced model.

    Returns:
        Set of node names.
    """
    nonneg: set[str] = set()
    for node in gm.graph.nodes:
        ins = tensor_inputs(node)
        if is_relu(gm, node):
            nonneg.add(node.name)
        elif ins and (is_data_movement(gm, node) or is_average(gm, node)) and ins[0].name in nonneg:
            nonneg.add(node.name)
        elif is_residual_add(node) and all(a.name in nonneg for a in node.args[:2]):
            nonneg.add(node.name)
        elif node.op == "call_function" and node.target in (torch.cat, aten.cat.default):
            seq = node.args[0] if node.args else []
            if seq and all(isinstance(a, fx.Node) and a.name in nonneg for a in seq):
                nonneg.add(node.name)
    return nonneg
