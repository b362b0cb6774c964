"""The aligned activation point (AlignQ, methods.md section 4): ``Q(gain * erf(x / sqrt 2))`` on integer engines.

AlignQ maps the output of each BN through the normal CDF, ``gain * (2 Phi(x) - 1) = gain * erf(x / sqrt 2)``,
quantizes it on a uniform grid and applies the ReLU. The network after alignment is a different network from the
float one, and it deploys exactly:

- the ReLU commutes with the alignment (erf is odd and increasing, erf(0) = 0) and is absorbed by an unsigned
  grid, so the point sits on the ReLU output like any other activation point;
- that non-negative tensor is first quantized to 8-bit codes on a fixed input grid that covers the range where
  the output still changes (``erf(x/sqrt2) * n < n - 1/2``, beyond it every input gives the top code), so the
  conv before it stays a fused integer kernel (``QLinearConv`` with a uint8 output);
- the aligned value is quantized with scale ``gain / n``, ``n = spec.qmax`` (``n = 2^k - 1`` levels above zero on
  the unsigned k-bit grid): ``code = round(n * erf(x / sqrt 2))``.

Because the input of the nonlinearity is one of 256 codes, the whole point is a table from incoming codes to
outgoing codes (:func:`lookup_table`). QuantSim computes it with float32 torch ops in the order the exported
``DQ -> Mul(1/sqrt2) -> Erf -> Mul(gain) -> Q`` chain computes it; the exporter can also write the table itself
(``Q -> Cast -> Gather -> DQ``), which no runtime can compute differently.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from qexport.errors import QexportError
from qexport.quant.fake_quant import fake_quant
from qexport.quant.spec import QuantSpec, activation_spec

DEFAULT_GAIN = 2.0  # a in the paper: the aligned activation lies in (-a, a)
INV_SQRT2 = np.float32(1.0 / math.sqrt(2.0))  # the float32 constant of the exported Mul
IN_BITS = 8


def saturation_input(n: int) -> float:
    """The input above which ``round(n * erf(x / sqrt 2))`` is ``n`` (the top code).

    Args:
        n: top code of the output grid.

    Returns:
        ``sqrt(2) * erfinv(1 - 1/(2n))``.
    """
    return math.sqrt(2.0) * float(torch.erfinv(torch.tensor(1.0 - 0.5 / n, dtype=torch.float64)))


def default_in_scale(spec: QuantSpec, in_spec: QuantSpec) -> float:
    """The fixed scale of the incoming 8-bit codes: ``in_spec.qmax`` codes span 5 % beyond saturation.

    Args:
        spec: the outgoing grid.
        in_spec: the incoming grid.

    Returns:
        The scale (a float32 value).
    """
    return float(np.float32(1.05 * saturation_input(spec.qmax) / in_spec.qmax))


def aligned_forward(x: torch.Tensor, in_scale: torch.Tensor, in_spec: QuantSpec, gain: float,
                    scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The aligned activation as QuantSim computes it (straight-through rounding, erf's own gradient).

    Args:
        x: the non-negative tensor of the point (ReLU output).
        in_scale: scale of the incoming codes.
        in_spec: incoming grid.
        gain: a.
        scale: outgoing scale (``gain / spec.qmax``).
        spec: outgoing grid.

    Returns:
        The dequantized outgoing values.
    """
    xq = fake_quant(x, in_scale, in_spec.qmin, in_spec.qmax)
    y = torch.erf(xq * torch.tensor(INV_SQRT2, dtype=xq.dtype)) * torch.tensor(np.float32(gain), dtype=xq.dtype)
    return fake_quant(y, scale, spec.qmin, spec.qmax)


def aligned_float(x: torch.Tensor, gain: float) -> torch.Tensor:
    """The aligned activation without quantization (the aligned network in float)."""
    return torch.erf(x * torch.tensor(INV_SQRT2, dtype=x.dtype)) * torch.tensor(np.float32(gain), dtype=x.dtype)


def lookup_table(in_scale: float, in_spec: QuantSpec, gain: float, scale: float, spec: QuantSpec) -> np.ndarray:
    """Outgoing code for every incoming code ``in_spec.qmin .. in_spec.qmax`` (index = code - qmin).

    Computed by :func:`aligned_forward` itself, so QuantSim and the table cannot disagree.

    Args:
        in_scale: incoming scale.
        in_spec: incoming grid.
        gain: a.
        scale: outgoing scale.
        spec: outgoing grid.

    Returns:
        int64 array of outgoing codes, length ``in_spec.levels``.
    """
    codes = torch.arange(in_spec.qmin, in_spec.qmax + 1, dtype=torch.float32)
    s_in = torch.tensor(np.float32(in_scale))
    s_out = torch.tensor(np.float32(scale))
    with torch.no_grad():
        y = aligned_forward(codes * s_in, s_in, in_spec, gain, s_out, spec)
        return torch.round(y / s_out).to(torch.int64).numpy()


def make_aligned(point, target: str, gain: float = DEFAULT_GAIN):
    """An ``erf`` ActPoint replacing a linear point on a non-negative tensor.

    Args:
        point: the linear ActPoint (unsigned grid).
        target: the plan's target (the incoming 8-bit grid is signed on tensorrt).
        gain: a.

    Returns:
        The aligned ActPoint.
    """
    from qexport.quant.targets import targets_with

    if target not in targets_with("erf_encodings"):
        raise QexportError(f"target {target!r} cannot run Erf, which aligned activations need; use one of "
                           f"{', '.join(targets_with('erf_encodings'))} or --opt align=weights")
    if not gain > 0:
        raise QexportError(f"the alignment gain a must be positive, got {gain}")
    if point.spec.signed:
        raise QexportError(f"activation point {point.name!r} has a signed grid; only non-negative (ReLU) tensors align")
    spec = point.spec
    in_spec = activation_spec(IN_BITS, non_negative=(target != "tensorrt"))
    return dataclasses.replace(point, spec=spec, kind="erf", gain=float(gain), in_spec=in_spec)


def bn_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The Conv/Linear modules whose output goes straight into a BatchNorm (folded later), and that BN.

    Args:
        model: the unfolded float model.

    Returns:
        Module name -> the BatchNorm module after it.
    """
    from qexport.models.fold import trace

    gm = trace(model)
    mods = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(node.target), torch.nn.modules.batchnorm._BatchNorm):
            prev = node.args[0] if node.args else None
            if getattr(prev, "op", None) == "call_module" and len(prev.users) == 1:
                out[prev.target] = mods[node.target]
    return out


def align_plan(plan, folded, with_bn, gain: float = DEFAULT_GAIN):
    """Turn every activation point on ``ReLU(BN(conv))`` into an aligned (erf) point.

    Args:
        plan: the QuantPlan (with activation points).
        folded: the BN-folded GraphModule the plan was built from.
        with_bn: layers that had a BN after them (:func:`bn_layers` of the unfolded model).
        gain: a.

    Returns:
        (the new plan, names of the aligned points); raises QexportError naming the layers when a ReLU
        point follows a quantized layer that had no BN (activation alignment standardises a BN output).
    """
    from qexport.quant import graph_ops

    if plan.bits.act_bits is None:
        raise QexportError("activation alignment needs quantized activations (--bits wNaM); "
                           "use --opt align=weights for a weights-only run")
    by_name = {n.name: n for n in folded.graph.nodes}
    quantized = {lp.name for lp in plan.layers}
    new, aligned, missing = [], [], []
    for ap in plan.activations:
        node = by_name.get(ap.name)
        src = graph_ops.tensor_inputs(node)[0] if node is not None and graph_ops.tensor_inputs(node) else None
        if (node is None or src is None or not graph_ops.is_relu(folded, node) or src.op != "call_module"
                or src.target not in quantized or ap.spec.signed):
            new.append(ap)
            continue
        if src.target not in with_bn:
            missing.append(src.target)
            new.append(ap)
            continue
        new.append(make_aligned(ap, plan.target, gain))
        aligned.append(ap.name)
    if missing:
        raise QexportError(f"activation alignment standardises BN outputs, but layer(s) {', '.join(missing)} have "
                           "no BatchNorm before their ReLU; use --opt align=weights or add BN")
    if not aligned:
        raise QexportError("no activation point follows a Conv-BN-ReLU, nothing to align; use --opt align=weights")
    return dataclasses.replace(plan, activations=tuple(new)), aligned


def relu_points(plan, folded) -> list[str]:
    """Activation points on a ReLU output straight after a quantized layer (BN or not): the points alignment
    would take, where ``--no-cdf`` still preserves correlations.

    Args:
        plan: the QuantPlan.
        folded: its BN-folded GraphModule.

    Returns:
        Point names.
    """
    from qexport.quant import graph_ops

    by_name = {n.name: n for n in folded.graph.nodes}
    quantized = {lp.name for lp in plan.layers}
    out = []
    for ap in plan.activations:
        node = by_name.get(ap.name)
        ins = graph_ops.tensor_inputs(node) if node is not None else []
        if (ins and graph_ops.is_relu(folded, node) and ins[0].op == "call_module" and ins[0].target in quantized
                and not ap.spec.signed):
            out.append(ap.name)
    return out
