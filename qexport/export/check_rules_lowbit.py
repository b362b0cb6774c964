"""Rules for low-bit activations clipped on their integer codes: ``Q -> Clip(codes, lo, hi) -> DQ``.

Below 8 bits the onnxruntime export clips the 8-bit codes to the low-bit grid between Q and DQ (qdq.py), so
ONNX Runtime still fuses the conv in front of the Q. TensorRT accepts only a Q feeding a DQ (its ``qdq-pair``
rule flags the Clip); for the other targets ``code-clip`` holds such a Clip to what makes it exact: constant
bounds of the codes' own type that equal a low-bit activation grid around the Q's zero point (unsigned
``[zp, zp + 2^b - 1]``, signed ``[zp - 2^(b-1), zp + 2^(b-1) - 1]`` or its narrow form), read only by DQs with
the Q's scale and zero point.

Rule ids: code-clip.
"""

from __future__ import annotations

import numpy as np
import onnx

from qexport.export.check import GraphIndex, Violation, register_rule
from qexport.export.check_rules import DQ, QRANGE, Q, _inp, _same, _scale, _tname, _zp

from qexport.quant.targets import targets_with

CODE_CLIP_RULE_TARGETS = targets_with("code_clip")  # the targets whose exports clip the codes


def is_code_clip(ix: GraphIndex, node: onnx.NodeProto) -> bool:
    """A Clip whose data input is the output of a QuantizeLinear (it clips integer codes).

    Args:
        ix: the graph index.
        node: any node.

    Returns:
        True for a Clip on codes.
    """
    if node.op_type != "Clip" or not node.input:
        return False
    p = ix.producer.get(node.input[0])
    return p is not None and p.op_type == Q


def grid_bits(lo: int, hi: int, zp: int) -> int | None:
    """The width b of the activation grid ``[lo - zp, hi - zp]`` (1..7), or None when it is no such grid.

    Args:
        lo: lower code bound.
        hi: upper code bound.
        zp: the zero point.

    Returns:
        b, or None.
    """
    a, b = lo - zp, hi - zp
    for bits in range(1, 8):
        half = 2 ** (bits - 1)
        if (a, b) in ((0, 2**bits - 1), (-half, half - 1), (-half + 1, half - 1)):
            return bits
    return None


def _clip_problem(ix: GraphIndex, clip: onnx.NodeProto, q: onnx.NodeProto) -> str | None:
    """What is wrong with a code clip, or None."""
    t = ix.elem_type(clip.input[0])
    names = [_inp(clip, 1), _inp(clip, 2)]
    if not all(names):
        return "needs both bounds (min and max) as inputs"
    vals = [ix.const(n) for n in names]
    if any(v is None for v in vals):
        return "bounds are not constant"
    types = [ix.elem_type(n) for n in names]
    if t is not None and any(bt is not None and bt != t for bt in types):
        return f"bounds of type {'/'.join(_tname(b) for b in types)} on {_tname(t)} codes"
    if any(np.asarray(v).size != 1 for v in vals):
        return "bounds are not scalars"
    lo, hi = (int(np.asarray(v).reshape(-1)[0]) for v in vals)
    zp_arr, _ = _zp(ix, q)
    if zp_arr is None or zp_arr.size != 1:
        return "the Q's zero point is not a per-tensor constant"
    zp = int(zp_arr.reshape(-1)[0])
    rng = QRANGE.get(t) if t is not None else None
    if rng is not None and not rng[0] <= lo <= hi <= rng[1]:
        return f"bounds [{lo}, {hi}] outside {_tname(t)}"
    if grid_bits(lo, hi, zp) is None:
        return (f"bounds [{lo}, {hi}] with zero point {zp} are not a low-bit grid ([zp, zp + 2^b - 1] or "
                f"[zp - 2^(b-1), zp + 2^(b-1) - 1], b < 8)")
    s = _scale(ix, q)
    for c in ix.consumers.get(clip.output[0], []):
        if c.op_type != DQ:
            return f"its output feeds {c.op_type} {ix.label(c)}, not a DequantizeLinear"
        if not _same(s, _scale(ix, c)) or not _same(zp_arr, _zp(ix, c)[0]):
            return f"DQ {ix.label(c)} differs in scale or zero point from {ix.label(q)}"
    return None


@register_rule("code-clip", CODE_CLIP_RULE_TARGETS,
               "a Clip on Q codes has constant bounds of the codes' type equal to a low-bit grid, then only DQs")
def rule_code_clip(model: onnx.ModelProto, ix: GraphIndex) -> list[Violation]:
    out = []
    for clip in ix.nodes:
        if not is_code_clip(ix, clip):
            continue
        problem = _clip_problem(ix, clip, ix.producer[clip.input[0]])
        if problem:
            out.append(Violation("code-clip", ix.label(clip), f"Clip on the codes of {clip.input[0]}: {problem}"))
    return out
