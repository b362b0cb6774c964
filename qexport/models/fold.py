"""Fold BatchNorm into the preceding Conv2d / Linear of an eval model, on a torch.fx graph."""

from __future__ import annotations

import copy

import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from qexport.errors import QexportError

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _PathTracer(fx.Tracer):
    """A tracer that remembers the innermost module being traced when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_at: tuple[str, str] | None = None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                try:
                    path = self.path_of_module(m)
                except NameError:
                    path = "?"
                self.failed_at = (path or "<root>", type(m).__name__)
            raise


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model`` with torch.fx (a GraphModule is returned as a deep copy).

    Args:
        model: the float model.

    Returns:
        A GraphModule; raises QexportError naming the module that cannot be traced.
    """
    if isinstance(model, fx.GraphModule):
        return copy.deepcopy(model)
    tracer = _PathTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises TraceError, TypeError, RuntimeError ...
        where = tracer.failed_at or ("<root>", type(model).__name__)
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise QexportError(
            f"torch.fx cannot trace module '{where[0]}' ({where[1]}): {first}; make its forward free of "
            "data-dependent control flow, or export the model with torch.export and pass the .pt2 file"
        ) from None
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def fold_batchnorm(model: nn.Module) -> fx.GraphModule:
    """Copy and trace an eval model, then fold every BatchNorm that directly follows a Conv or Linear.

    The folded conv keeps the conv's module name (``layer1.0.conv1``) and gains a bias; the BatchNorm
    module disappears. BatchNorms not preceded by a Conv/Linear that feeds only them are kept.

    Args:
        model: the float model (not modified); for ``.pt2`` models pass the GraphModule from ``load_model``.

    Returns:
        A GraphModule in eval mode computing the same outputs.
    """
    was_training = model.training
    model.eval()
    try:
        gm = trace(model)
    finally:
        model.train(was_training)
    gm.eval()
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BNS):
            continue
        prev = node.args[0] if node.args else None
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer, bn = modules.get(prev.target), modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        if isinstance(layer, _CONVS) and type(layer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            fused = fuse_conv_bn_eval(layer, bn)
        elif type(layer) is nn.Linear and isinstance(bn, nn.BatchNorm1d):
            fused = fuse_linear_bn_eval(layer, bn)
        else:
            continue
        parent_path, _, last = prev.target.rpartition(".")
        setattr(gm.get_submodule(parent_path) if parent_path else gm, last, fused)
        modules[prev.target] = fused
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
