"""The QDQ rules about how nodes connect (see ../shared/docs/numerics.md), registered with
:func:`qexport.export.check.register_rule`: what feeds a quantized compute node and a residual Add, Clip bounds
before a Q, Q/DQ pairing, integer code lookups, the int32 bias grid.

Rule ids: quantized-inputs, residual-add, clip-range, trt-no-lookup, qdq-pair, bias-int32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from qexport.export.check import GraphIndex, Violation, register_rule
from qexport.export.check_rules import (ALL, COMPUTE, DQ, QRANGE, TRT_ORT, Q, _attr, _from_dq, _inp, _per_tensor, _qdq,
                                        _qtype, _same, _scale, _tname, _zp)


@register_rule("quantized-inputs", TRT_ORT, "data and weight inputs of Conv/ConvTranspose/Gemm/MatMul come from DQ")
def rule_quantized_inputs(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    out = []
    for node in ix.nodes:
        if node.op_type not in COMPUTE or node.name in ix.float_nodes:
            continue
        missing = [f"{what} {_inp(node, i)}" for i, what in ((0, "data"), (1, "weight"))
                   if _from_dq(ix, _inp(node, i)) is None]
        if missing:
            out.append(Violation("quantized-inputs", ix.label(node), f"{node.op_type} input(s) not from a "
                                 f"DequantizeLinear: {', '.join(missing)} (or list it in qexport.float_nodes)"))
    return out


def _quantized_compute(ix: GraphIndex, name: str) -> bool:
    p = ix.producer.get(name)
    return (p is not None and p.op_type in COMPUTE
            and all(_from_dq(ix, _inp(p, i)) is not None for i in (0, 1)))


@register_rule("residual-add", TRT_ORT, "a residual Add's inputs come from a DQ or straight from a quantized conv")
def rule_residual_add(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    """TensorRT: each input from a DQ or straight from a quantized Conv/Gemm/MatMul (placement rule of
    ../shared/docs/architecture.md: conv + conv joins, as in ResNet downsample blocks, need no Q/DQ).
    onnxruntime (looser): at least one input from a DQ, or every input straight from a quantized Conv/Gemm/MatMul."""
    out = []
    for node in ix.nodes:
        if node.op_type != "Add" or len(node.input) != 2 or node.name in ix.float_nodes:
            continue
        if any(ix.is_constant(i) for i in node.input):
            continue
        from_dq = [_from_dq(ix, i) is not None for i in node.input]
        from_conv = [_quantized_compute(ix, i) for i in node.input]
        if all(from_conv):
            continue
        if ix.target == "tensorrt":
            for inp, q, c in zip(node.input, from_dq, from_conv):
                if not q and not c:
                    out.append(Violation("residual-add", ix.label(node), f"input {inp} comes neither from a DQ "
                                         "nor straight from a quantized Conv/Gemm/MatMul: quantize it"))
        elif not any(from_dq):
            out.append(Violation("residual-add", ix.label(node), "no input comes from a DequantizeLinear: "
                                 "quantize the residual input"))
    return out


def _clip_bounds(ix: GraphIndex, clip: onnx.NodeProto) -> list[tuple[str, float | None, bool]]:
    """(which, value, constant) for each bound present."""
    res = []
    for i, which, attr in ((1, "min", "min"), (2, "max", "max")):
        name = _inp(clip, i)
        if name:
            v = ix.const(name)
            res.append((which, None if v is None else float(np.asarray(v).reshape(-1)[0]), v is not None))
        elif _attr(clip, attr) is not None:
            res.append((which, float(_attr(clip, attr)), True))
    return res


@register_rule("clip-range", ALL, "a Clip before a Q has constant bounds within the Q's range (half a step)")
def rule_clip_range(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    out = []
    for clip in ix.nodes:
        if clip.op_type != "Clip" or not clip.output:
            continue
        qs = [c for c in ix.consumers.get(clip.output[0], []) if c.op_type == Q]
        if not qs:
            continue
        bounds = _clip_bounds(ix, clip)
        nonconst = [w for w, _, c in bounds if not c]
        if nonconst:
            out.append(Violation("clip-range", ix.label(clip), f"{'/'.join(nonconst)} not constant"))
            continue
        b = {w: v for w, v, _ in bounds}
        if "min" in b and "max" in b and b["min"] > b["max"]:
            out.append(Violation("clip-range", ix.label(clip), f"min {b['min']} > max {b['max']}"))
            continue
        if b.get("min") == 0.0 and b.get("max") == 6.0:  # ReLU6, a model activation: the Q saturates anyway
            continue
        for q in qs:
            s, (zp, _), t = _scale(ix, q), _zp(ix, q), _qtype(ix, q)
            if s is None or zp is None or t not in QRANGE or not _per_tensor(s) or zp.size != 1:
                continue
            s, z = float(s.reshape(-1)[0]), float(zp.reshape(-1)[0])
            lo, hi = (QRANGE[t][0] - z - 0.5) * s, (QRANGE[t][1] - z + 0.5) * s
            for which, v in b.items():
                if not lo <= v <= hi:
                    out.append(Violation("clip-range", ix.label(clip), f"{which} {v:g} outside the range "
                                         f"[{lo:g}, {hi:g}] of {ix.label(q)} ({_tname(t)}, scale {s:g})"))
    return out


def _code_lookup(ix: GraphIndex, cast: onnx.NodeProto) -> bool:
    """``Q -> Cast -> Gather(constant table) -> DQ``: a table from one tensor's codes to another's (aligned points)."""
    if cast.op_type != "Cast":
        return False
    users = ix.consumers.get(cast.output[0], [])
    if len(users) != 1 or users[0].op_type != "Gather" or not ix.is_constant(users[0].input[0]):
        return False
    return all(c.op_type == DQ for c in ix.consumers.get(users[0].output[0], []))


@register_rule("trt-no-lookup", ("tensorrt",), "TensorRT: no integer code lookup (Gather on Q codes)")
def rule_trt_no_lookup(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    return [Violation("trt-no-lookup", ix.label(q), "a table lookup on Q codes (Gather of a uint8 table) is not "
                      "TensorRT's explicit-quantization form; export aligned points with --erf-encoding erf")
            for q in _qdq(ix) if q.op_type == Q and any(_code_lookup(ix, c) for c in ix.consumers.get(q.output[0], []))]


@register_rule("qdq-pair", ALL, "a Q feeds only DQ nodes with the same scale, zero point and axis (or a code lookup)")
def rule_qdq_pair(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    out = []
    for q in _qdq(ix):
        if q.op_type != Q:
            continue
        if q.output[0] in ix.graph_outputs:
            out.append(Violation("qdq-pair", ix.label(q), "Q output is a graph output: follow it with a DQ"))
        s, (zp, _) = _scale(ix, q), _zp(ix, q)
        for c in ix.consumers.get(q.output[0], []):
            if _code_lookup(ix, c):
                continue
            if c.op_type == "Clip" and ix.target != "tensorrt":
                continue  # a low-bit clip of the codes: the code-clip rule checks it and its DQs
            if c.op_type != DQ:
                out.append(Violation("qdq-pair", ix.label(q), f"Q output feeds {c.op_type} {ix.label(c)}, not a DQ"))
                continue
            cs, (czp, _) = _scale(ix, c), _zp(ix, c)
            per_channel = s is not None and not _per_tensor(s)
            if not _same(s, cs) or not _same(zp, czp) or (per_channel and _attr(q, "axis", 1) != _attr(c, "axis", 1)):
                out.append(Violation("qdq-pair", ix.label(q), f"DQ {ix.label(c)} differs in scale, zero point or "
                                     "axis from its Q"))
    return out


@register_rule("bias-int32", TRT_ORT, "a quantized bias is int32, zero point 0, scale = input scale * weight scale")
def rule_bias_int32(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    out = []
    for node in ix.nodes:
        bdq = _from_dq(ix, _inp(node, 2)) if node.op_type in ("Conv", "ConvTranspose", "Gemm") else None
        if bdq is None:
            continue
        where, t = ix.label(node), _qtype(ix, bdq)
        if t is not None and t != TensorProto.INT32:
            out.append(Violation("bias-int32", where, f"bias DQ {ix.label(bdq)} has type {_tname(t)}, not int32"))
        zp, _ = _zp(ix, bdq)
        if zp is not None and np.any(zp != 0):
            out.append(Violation("bias-int32", where, f"bias DQ {ix.label(bdq)} zero point is not 0"))
        xdq, wdq = _from_dq(ix, _inp(node, 0)), _from_dq(ix, _inp(node, 1))
        sb = _scale(ix, bdq)
        sx, sw = (_scale(ix, xdq) if xdq else None), (_scale(ix, wdq) if wdq else None)
        if sb is None or sx is None or sw is None or not _per_tensor(sx):
            continue  # reported by quantized-inputs / activation-per-tensor
        exp = (float(sx.reshape(-1)[0]) * sw.astype(np.float64)).reshape(-1)
        got = sb.astype(np.float64).reshape(-1)
        if got.size == 1 and exp.size > 1:
            got = np.full(exp.size, got[0])
        elif exp.size == 1 and got.size > 1:
            exp = np.full(got.size, exp[0])
        if got.size != exp.size or not np.allclose(got, exp, rtol=1e-6, atol=0.0):
            out.append(Violation("bias-int32", where, f"bias scale {_inp(bdq, 1)} != input scale * weight scale"))
    return out
