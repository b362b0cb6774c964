"""The QDQ rules of each target (see ../shared/docs/numerics.md), registered with
:func:`qexport.export.check.register_rule`.

Rule ids here (one tensor or one Q/DQ at a time): opset, onnx-checker, no-integer-ops, qdq-constant-params,
scale-positive, scale-shape, trt-zero-point, ort-qdq-types, weight-per-channel, weight-grid,
activation-per-tensor. How nodes connect (quantized-inputs, residual-add, clip-range, trt-no-lookup, qdq-pair,
bias-int32) lives in :mod:`qexport.export.check_rules_graph`; code-clip in :mod:`qexport.export.check_rules_lowbit`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from qexport.export.check import ALL, MODEL_NODE, GraphIndex, Violation, register_rule

Q, DQ = "QuantizeLinear", "DequantizeLinear"
QDQ = (Q, DQ)
COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
INTEGER_OPS = {"ConvInteger", "MatMulInteger", "QGemm", "DynamicQuantizeLinear", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul"}
QRANGE = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT16: (-32768, 32767),
          TensorProto.UINT16: (0, 65535), TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15)}
TRT_ORT = ("tensorrt", "onnxruntime")


def _tname(t: int | None) -> str:
    return TensorProto.DataType.Name(t) if t else "unknown"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _inp(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _qdq(ix: GraphIndex):
    return [n for n in ix.nodes if n.op_type in QDQ and n.domain in ("", "ai.onnx")]


def _scale(ix: GraphIndex, n: onnx.NodeProto) -> np.ndarray | None:
    return ix.const(_inp(n, 1)) if _inp(n, 1) else None


def _zp(ix: GraphIndex, n: onnx.NodeProto) -> tuple[np.ndarray | None, int | None]:
    """(zero point value, its element type); (0, UINT8) when absent (the ONNX default)."""
    name = _inp(n, 2)
    if not name:
        return np.zeros((), np.uint8), None
    return ix.const(name), ix.elem_type(name)


def _qtype(ix: GraphIndex, n: onnx.NodeProto) -> int | None:
    """The integer type of a Q's output / a DQ's input."""
    if _inp(n, 2):
        return ix.elem_type(_inp(n, 2))
    if n.op_type == DQ:
        return ix.elem_type(n.input[0])
    return TensorProto.UINT8


def _per_tensor(scale: np.ndarray) -> bool:
    return scale.size == 1 and scale.ndim <= 1


def _is_weight(ix: GraphIndex, n: onnx.NodeProto) -> bool:
    """A Q of a constant, or a DQ of a constant (or of a Q of a constant)."""
    if ix.is_constant(n.input[0]):
        return True
    p = ix.producer.get(n.input[0])
    return n.op_type == DQ and p is not None and p.op_type == Q and ix.is_constant(p.input[0])


def _from_dq(ix: GraphIndex, name: str) -> onnx.NodeProto | None:
    p = ix.producer.get(name)
    return p if p is not None and p.op_type == DQ else None


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return a is None or b is None or (a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b))


@register_rule("opset", ALL, "the default-domain opset is >= 13 (per-channel axis)")
def rule_opset(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    vs = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not vs:
        return [Violation("opset", MODEL_NODE, "no default-domain opset import")]
    if max(vs) < 13:
        return [Violation("opset", MODEL_NODE, f"opset {max(vs)} < 13: re-export with opset >= 13")]
    return []


@register_rule("onnx-checker", ALL, "onnx.checker.check_model passes and strict shape inference runs")
def rule_onnx_checker(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    try:
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as e:  # noqa: BLE001  (onnx raises many types; report its message)
        msg = " ".join(str(e).split())
        return [Violation("onnx-checker", MODEL_NODE, msg[:400] or type(e).__name__)]
    return []


@register_rule("no-integer-ops", ALL, "QDQ form only: no QLinear*, ConvInteger, MatMulInteger, QGemm ops")
def rule_no_integer_ops(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    return [Violation("no-integer-ops", ix.label(n), f"{n.op_type} is not QDQ form: export Q/DQ + float ops")
            for n in ix.nodes if n.op_type.startswith("QLinear") or n.op_type in INTEGER_OPS]


@register_rule("qdq-constant-params", ALL, "every Q/DQ has a constant scale and zero point")
def rule_constant_params(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    out = []
    for n in _qdq(ix):
        for i, what in ((1, "scale"), (2, "zero point")):
            name = _inp(n, i)
            if name and not ix.is_constant(name):
                out.append(Violation("qdq-constant-params", ix.label(n), f"{what} {name} is not a constant"))
            elif i == 1 and not name:
                out.append(Violation("qdq-constant-params", ix.label(n), "no scale input"))
    return out


@register_rule("scale-positive", ALL, "Q/DQ scales are strictly positive and finite")
def rule_scale_positive(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    out = []
    for n in _qdq(ix):
        s = _scale(ix, n)
        if s is None:
            continue
        s = s.astype(np.float64)
        bad = ~(np.isfinite(s) & (s > 0))
        if bad.any():
            vals = ", ".join(repr(float(v)) for v in s.reshape(-1)[bad.reshape(-1)][:4])
            out.append(Violation("scale-positive", ix.label(n), f"scale {_inp(n, 1)} has {int(bad.sum())} "
                                 f"non-positive or non-finite value(s): {vals}"))
    return out


@register_rule("scale-shape", ALL, "scale scalar or 1-D of the axis length, axis in range, zero point shaped alike")
def rule_scale_shape(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    out = []
    for n in _qdq(ix):
        s = _scale(ix, n)
        if s is None:
            continue
        where = ix.label(n)
        if _attr(n, "block_size", 0):
            out.append(Violation("scale-shape", where, "blocked quantization (block_size) is not supported"))
            continue
        zp, _ = _zp(ix, n)
        if _inp(n, 2) and zp is not None and zp.shape != s.shape:
            out.append(Violation("scale-shape", where, f"zero point shape {list(zp.shape)} != scale shape "
                                 f"{list(s.shape)}"))
        if s.ndim == 0 or (s.ndim == 1 and s.size == 1):
            continue
        if s.ndim > 1:
            out.append(Violation("scale-shape", where, f"scale must be a scalar or 1-D, got shape {list(s.shape)}"))
            continue
        shape, axis = ix.shape(n.input[0]), _attr(n, "axis", 1)
        if shape is None:
            continue
        if not -len(shape) <= axis < len(shape):
            out.append(Violation("scale-shape", where, f"axis {axis} out of range for rank {len(shape)}"))
        elif shape[axis] is not None and shape[axis] != s.size:
            out.append(Violation("scale-shape", where, f"per-channel scale has {s.size} values but axis {axis} "
                                 f"of {n.input[0]} has {shape[axis]}"))
    return out


@register_rule("trt-zero-point", ("tensorrt",), "TensorRT: Q/DQ are int8 (int32 bias) with zero point 0")
def rule_trt_zero_point(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    out = []
    for n in _qdq(ix):
        where, t = ix.label(n), _qtype(ix, n)
        if n.op_type == Q and not _inp(n, 2):
            out.append(Violation("trt-zero-point", where, "no zero point: the output defaults to uint8; "
                                 "TensorRT needs int8 with zero point 0"))
            continue
        ok_types = (TensorProto.INT8,) if n.op_type == Q else (TensorProto.INT8, TensorProto.INT32)
        if t is not None and t not in ok_types:
            out.append(Violation("trt-zero-point", where, f"type {_tname(t)}: TensorRT takes int8 only"))
        zp, _ = _zp(ix, n)
        if zp is not None and np.any(zp != 0):
            out.append(Violation("trt-zero-point", where, f"zero point {_inp(n, 2)} is not 0 "
                                 "(TensorRT: symmetric only)"))
    return out


@register_rule("ort-qdq-types", ("onnxruntime",), "ONNX Runtime: uint8 activations, int8 weights with zero point 0")
def rule_ort_types(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    out = []
    for n in _qdq(ix):
        where, t = ix.label(n), _qtype(ix, n)
        if t is None or t == TensorProto.INT32:  # unknown, or a bias (bias-int32)
            continue
        if _is_weight(ix, n):
            zp, _ = _zp(ix, n)
            if t != TensorProto.INT8:
                out.append(Violation("ort-qdq-types", where, f"weight type {_tname(t)}: use int8"))
            if zp is not None and np.any(zp != 0):
                out.append(Violation("ort-qdq-types", where, "weight zero point is not 0"))
        elif t != TensorProto.UINT8:
            out.append(Violation("ort-qdq-types", where, f"activation type {_tname(t)}: use uint8 "
                                 "(the int8-activation path of ONNX Runtime CPU is slow)"))
    return out


def _weight_axis(ix: GraphIndex, node: onnx.NodeProto, rank: int) -> tuple[int, ...]:
    if node.op_type == "Conv":
        return (0,)
    if node.op_type == "ConvTranspose":
        return {"tensorrt": (0,), "onnxruntime": (1,)}.get(ix.target, (0, 1))
    if node.op_type == "Gemm":
        return (0,) if _attr(node, "transB", 0) else (1,)
    return (rank - 1,)  # MatMul


@register_rule("weight-per-channel", ALL, "weight DQ of Conv/ConvTranspose/Gemm/MatMul is per output channel")
def rule_weight_per_channel(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    out = []
    for node in ix.nodes:
        dq = _from_dq(ix, _inp(node, 1)) if node.op_type in COMPUTE else None
        if dq is None or not _is_weight(ix, dq):
            continue
        s, shape = _scale(ix, dq), ix.shape(dq.input[0])
        if s is None or shape is None:
            continue
        want = _weight_axis(ix, node, len(shape))
        if _per_tensor(s) and not (0 <= want[0] < len(shape) and shape[want[0]] == 1):
            out.append(Violation("weight-per-channel", ix.label(dq), f"weight of {ix.label(node)} is per tensor: "
                                 f"quantize per output channel (axis {want[0]})"))
            continue
        axis = _attr(dq, "axis", 1)
        axis = axis + len(shape) if axis < 0 else axis
        if axis not in want:
            out.append(Violation("weight-per-channel", ix.label(dq), f"axis {axis} is not the output-channel axis "
                                 f"{want[0]} of {node.op_type} {ix.label(node)}"))
    return out


@register_rule("weight-grid", ALL, "weights recorded below 8 bits hold only their grid's integers (binary: -1, +1)")
def rule_weight_grid(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    out = []
    for name, grid in sorted(ix.weight_grids.items()):
        q = ix.const(name)
        if q is None:
            out.append(Violation("weight-grid", name, f"the {grid} weight named in the metadata is not a constant"))
            continue
        if grid == "binary":
            bad = int(((q != 1) & (q != -1)).sum())
            want = "-1 or +1 (binary grid, no zero level)"
        else:
            b = int(grid[3:])
            bad = int(((q < -(2 ** (b - 1))) | (q > 2 ** (b - 1) - 1)).sum())
            want = f"in [{-(2 ** (b - 1))}, {2 ** (b - 1) - 1}] ({grid})"
        if bad:
            out.append(Violation("weight-grid", name, f"{bad} integers are not {want}"))
    return out


@register_rule("activation-per-tensor", TRT_ORT, "a Q of an activation has a scalar scale")
def rule_activation_per_tensor(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    out = []
    for n in _qdq(ix):
        s = _scale(ix, n)
        if n.op_type == Q and s is not None and not _is_weight(ix, n) and not _per_tensor(s):
            out.append(Violation("activation-per-tensor", ix.label(n), f"activation {n.input[0]} has a scale of "
                                 f"shape {list(s.shape)}: activations are per tensor"))
    return out


from qexport.export import check_rules_graph  # noqa: E402,F401  (registers the graph-structure rules)
from qexport.export import check_rules_lowbit  # noqa: E402,F401  (registers code-clip)
