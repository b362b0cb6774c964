"""``torch.export`` programs (``.pt2``): load, infer the input shape, and lift aten conv/linear/batch-norm
call_functions on parameters into real ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm*d`` call_module nodes, so
code that looks for modules (BN folding, quantization placement) works on exported models too."""

from __future__ import annotations

import contextlib
import logging
import operator
import os
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from qexport.errors import QexportError

aten = torch.ops.aten


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Silence one logger (not its children) for the duration of the block."""
    logger = logging.getLogger(name)
    was = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = was


def load_pt2(path: str | os.PathLike) -> tuple[fx.GraphModule, tuple[int, ...] | None]:
    """Load a ``torch.export`` program and convert its aten layers to modules.

    Args:
        path: the ``.pt2`` file written by ``torch.export.save``.

    Returns:
        (GraphModule in eval mode, the example input shape (N, C, H, W) or None when unknown).
    """
    p = Path(path)
    if not p.is_file():
        raise QexportError(f"exported program {p} not found; check the path")
    try:
        with _quiet_logger("torch.export"):  # it logs a traceback for a bad archive before trying the old format
            ep = torch.export.load(str(p))
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad archives
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise QexportError(f"cannot load {p} as a torch.export program ({first[:150]}); save it with torch.export.save") from None
    shape = _example_shape(ep)
    gm = ep.module()
    lift_aten_modules(gm)
    gm = to_plain_graph_module(gm)
    gm.eval()
    return gm, shape


def to_plain_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Turn ``ExportedProgram.module()`` into an ordinary GraphModule: flat positional inputs, a single tensor
    output when the program returns one (a flat tuple otherwise), no input-shape guard, and working
    ``eval()`` / ``deepcopy``.

    The shape guard is dropped so a program exported with batch size 1 runs on calibration batches; a graph
    that hard-codes its batch size then fails in the op that depends on it.

    Args:
        gm: the module of an exported program (after :func:`lift_aten_modules`).

    Returns:
        A new GraphModule sharing the parameters.
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()
    out_spec = getattr(gm, "_out_spec", None)
    out = next(n for n in graph.nodes if n.op == "output")
    flat = out.args[0]
    if isinstance(flat, (tuple, list)) and len(flat) == 1 and out_spec is not None and out_spec.is_leaf():
        out.args = (flat[0],)
    graph.lint()
    return fx.GraphModule(gm, graph, class_name="ExportedModel")


def _example_shape(ep) -> tuple[int, ...] | None:
    ex = getattr(ep, "example_inputs", None)
    if ex:
        args = ex[0] if isinstance(ex, tuple) and len(ex) == 2 else ex
        if args and isinstance(args[0], torch.Tensor):
            return tuple(args[0].shape)
    try:
        name = ep.graph_signature.user_inputs[0]
        for n in ep.graph.nodes:
            if n.op == "placeholder" and n.name == name and isinstance(n.meta.get("val"), torch.Tensor):
                return tuple(int(d) for d in n.meta["val"].shape)
    except Exception:  # noqa: BLE001 - symbolic shapes or no user input
        pass
    return None


def _param(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise LookupError
    t = gm
    for part in node.target.split("."):
        t = getattr(t, part)
    return t


def _as_param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def _place(gm: fx.GraphModule, node: fx.Node, weight_node: fx.Node, mod: nn.Module, used: set[str]) -> str:
    """Install ``mod``: in place of the plain holder module that owned the weight when possible, else new."""
    path = weight_node.target.rsplit(".", 1)[0] if "." in weight_node.target else ""
    if path and path not in used:
        try:
            holder = gm.get_submodule(path)
        except AttributeError:
            holder = None
        own = {n for n, _ in holder.named_parameters(recurse=False)} | {n for n, _ in holder.named_buffers(recurse=False)} if holder is not None else set()
        new = {n for n, _ in mod.named_parameters(recurse=False)} | {n for n, _ in mod.named_buffers(recurse=False)}
        if holder is not None and type(holder) is nn.Module and not list(holder.children()) and own <= new:
            parent_path, _, last = path.rpartition(".")
            parent = gm.get_submodule(parent_path) if parent_path else gm
            setattr(parent, last, mod)
            used.add(path)
            return path
    base = (path or node.name).replace(".", "_") + "_" + type(mod).__name__.lower()
    name, i = base, 1
    while hasattr(gm, name) or name in used:
        name, i = f"{base}{i}", i + 1
    gm.add_submodule(name, mod)
    used.add(name)
    return name


def _arg(node: fx.Node, i: int, name: str, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _pair(v) -> tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return (int(v[0]), int(v[-1]))


def _conv(gm, node):
    t = node.target
    if t is aten.conv2d.default:
        x, w, b = node.args[0], node.args[1], _arg(node, 2, "bias", None)
        stride, pad, dil = _arg(node, 3, "stride", [1]), _arg(node, 4, "padding", [0]), _arg(node, 5, "dilation", [1])
        groups = _arg(node, 6, "groups", 1)
    elif t is aten.convolution.default:
        x, w, b, stride, pad, dil, transposed, _, groups = node.args[:9]
        if transposed:
            return None
    else:
        return None
    weight, bias = _param(gm, w), _param(gm, b)
    if weight.dim() != 4:
        return None
    oc, icg, kh, kw = weight.shape
    m = nn.Conv2d(icg * groups, oc, (kh, kw), _pair(stride), _pair(pad), _pair(dil), groups, bias=bias is not None)
    m.weight = _as_param(weight)
    if bias is not None:
        m.bias = _as_param(bias)
    return m, x, w


def _linear(gm, node):
    if node.target is not aten.linear.default:
        return None
    x, w, b = node.args[0], node.args[1], _arg(node, 2, "bias", None)
    weight, bias = _param(gm, w), _param(gm, b)
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    m.weight = _as_param(weight)
    if bias is not None:
        m.bias = _as_param(bias)
    return m, x, w


def _bn(gm, node):
    t = node.target
    if t is aten.batch_norm.default:
        x, w, b, rm, rv, training, momentum, eps = node.args[:8]
        if training:
            return None
    elif t is aten._native_batch_norm_legit_no_training.default:
        x, w, b, rm, rv, momentum, eps = node.args[:7]
    else:
        return None
    if rm is None or rv is None:
        return None
    weight, bias, mean, var = _param(gm, w), _param(gm, b), _param(gm, rm), _param(gm, rv)
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    rank = val.dim() if isinstance(val, torch.Tensor) else 4
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank, nn.BatchNorm2d)
    m = cls(mean.shape[0], eps=float(eps), momentum=float(momentum), affine=weight is not None)
    if weight is not None:
        m.weight = _as_param(weight)
        m.bias = _as_param(bias) if bias is not None else nn.Parameter(torch.zeros_like(weight), requires_grad=False)
    m.running_mean = mean
    m.running_var = var
    path = rm.target.rsplit(".", 1)[0] if "." in rm.target else ""
    try:
        nbt = gm.get_submodule(path).num_batches_tracked if path else None
        if isinstance(nbt, torch.Tensor):
            m.num_batches_tracked = nbt
    except AttributeError:
        pass
    m.eval()
    return m, x, rm


def lift_aten_modules(gm: fx.GraphModule) -> int:
    """Rewrite aten conv2d / convolution / linear / eval batch-norm call_functions whose parameters are
    get_attr nodes into call_module nodes of real modules (in place).

    Args:
        gm: a GraphModule from ``ExportedProgram.module()``.

    Returns:
        The number of nodes converted.
    """
    used: set[str] = set()
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        try:
            made = _conv(gm, node) or _linear(gm, node) or _bn(gm, node)
        except LookupError:  # a weight that is computed, not a parameter: leave the op as it is
            made = None
        if made is None:
            continue
        mod, x, key_node = made
        name = _place(gm, node, key_node, mod, used)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x,))
        new.meta = dict(node.meta)
        if node.target is aten._native_batch_norm_legit_no_training.default:
            users = list(node.users)
            if not all(u.target is operator.getitem for u in users) or any(u.args[1] != 0 for u in users if u.users):
                gm.graph.erase_node(new)
                continue
            for u in users:
                if u.args[1] == 0:
                    u.replace_all_uses_with(new)
                    new.meta = dict(u.meta)
                gm.graph.erase_node(u)
        else:
            node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return count
