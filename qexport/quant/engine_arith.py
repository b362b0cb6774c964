"""ONNX Runtime's integer arithmetic inside QuantSim, for verification only.

An INT8 engine does not compute ``round(y / s_out)`` from a float ``y``: its fused kernels requantize integer
accumulators with float32 multipliers of their own. A value within float rounding of a rounding boundary then
lands on a different level in the engine than in fake quantization, and such one-level flips grow block by
block (ResNet-20 GPFQ W4A8: 0.011 % of the codes after the first conv, a quarter of them at the classifier).
This module makes QuantSim compute what ONNX Runtime's x86-64 CPU provider computes, read from its MLAS
sources (onnxruntime 1.2x/1.3x):

- QLinearConv, and QGemm with a quantized output (``DQ -> Conv/Gemm [-> Relu] -> Q``; ORT drops a Relu before
  a Q whose zero point is the bottom of the range): ``acc`` = exact int32 sum of ``(x_u8 - zp_x) * w_s8`` plus
  the int32 bias; multiplier per output channel ``float32(float32(x_scale * w_scale[c]) / y_scale)``;
  ``float32(acc) * multiplier`` in float32, clamped to ``[0 - zp_y, 255 - zp_y]``, rounded half to even
  (``cvtps2dq``), plus ``zp_y``. The same in the ConvSym assembly kernels (AVX2/AVX512/VNNI) and in
  ``MlasRequantizeOutput`` (the im2col path, e.g. a first conv with 3 input channels).
- QGemm with a float output (the classifier): ``float32(acc) * float32(a_scale * b_scale[c])``.
- QLinearAdd: on x86-64 (``MlasQLinearAddU8KernelAvx2``, also used on AVX512 machines) it is float32 with FMA,
  not the fixed-point ``MlasCalcQLinearAddParameters`` path (that one is ARM NEON only): ``rA = float32(sA/sC)``,
  ``rB = float32(sB/sC)``, ``F = float32(zpC - (rA*zpA + rB*zpB))``, then per element
  ``round_half_even(fma(a_u8, rA, fma(b_u8, rB, F)))`` saturated to uint8 (``a``/``b`` are the raw codes).
- GlobalAveragePool (float): four float32 lanes each summing every fourth element in order, reduced as
  ``(l0 + l2) + (l1 + l3)``, then the remainder elements one by one, divided by the element count.
- QLinearGlobalAveragePool (``DQ -> GlobalAveragePool -> Q``, MLAS ``MlasQLinearGlobalAveragePool``): exact
  int32 sum of ``x_u8 - zp_x`` over the image, times ``float32(s_x / float32(s_y * float32(size)))`` in
  float32, clamped, rounded half to even, plus ``zp_y`` (the requantization above).
- Low-bit outputs: the exporter clips the uint8 *codes* after the Q (``Q -> Clip -> DQ``), so the kernel in
  front still fuses and the Clip clamps its output levels to the low-bit grid exactly.

Everything else QuantSim already computes the way the engine does (QuantizeLinear divides by the scale in
float32 and rounds half to even, DequantizeLinear multiplies, float Add/Relu, moves of codes). Convolutions
the engine runs in float (a conv of an old plan whose output feeds a residual Add without a quantizer) keep
QuantSim's arithmetic: their float32 summation order is MLAS's own and is not emulated.

- x86 CPUs without VNNI: their u8s8 kernels saturate int16 sums of product pairs (8-bit weights only);
  qexport/quant/u8s8_saturation.py adds that to the accumulators where the kernels, asked, show it.

Not emulated: ARM (its QLinearAdd is fixed point), grouped convolutions on CPUs without VNNI, int32 overflow.
"""

from __future__ import annotations

import platform

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from qexport.errors import QexportError
from qexport.quant import graph_ops
from qexport.quant.quantsim import ActQuantizer, QuantConv2d, QuantLinear
from qexport.quant.u8s8_saturation import PAD_CODE, PAIR_ORDER, pairs_saturate, saturation_correction

ARITHMETIC_NAME = "onnxruntime-integer"
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_X86 = ("x86_64", "amd64", "x64", "i686", "i386")


def _f32(v) -> np.float32:
    """A float32 scalar (scales are float32 initializers in the ONNX file)."""
    return np.float32(v.item() if isinstance(v, torch.Tensor) else v)


def ort_encoding(spec) -> tuple[int, bool]:
    """Zero point of an activation grid in the onnxruntime export, and whether it needs a Clip (low-bit grid).

    Args:
        spec: the activation QuantSpec.

    Returns:
        (uint8 zero point, True when the exporter clips the codes to a low-bit grid after the Q).
    """
    from qexport.quant.targets import get_target

    _, zp, clip = get_target("onnxruntime").act_encoding(spec)
    return zp, clip is not None


def requantize_levels(acc: torch.Tensor, multiplier: torch.Tensor, zero_point: int) -> torch.Tensor:
    """ORT's requantization of exact int32 accumulators to uint8, as levels (code minus zero point).

    Args:
        acc: accumulators (integers held exactly in float64), bias already added.
        multiplier: float32 output multipliers, broadcastable to ``acc`` (per output channel).
        zero_point: the output zero point (0 or 128).

    Returns:
        float32 levels in ``[-zero_point, 255 - zero_point]``.
    """
    # float32(acc) rounds half to even like cvtdq2ps; the product is one float32 rounding like mulps.
    v = acc.to(torch.float32) * multiplier.to(torch.float32)
    return torch.round(torch.clamp(v, float(-zero_point), float(255 - zero_point)))


def clamp_to_grid(levels: torch.Tensor, spec) -> torch.Tensor:
    """The exporter's Clip of the codes to a low-bit grid, on levels (code minus zero point).

    Args:
        levels: float levels.
        spec: the output's activation QuantSpec.

    Returns:
        The levels clamped to ``[spec.qmin, spec.qmax]`` (unchanged for 8-bit grids).
    """
    return torch.clamp(levels, float(spec.qmin), float(spec.qmax))


def qlinear_global_average_pool(levels: torch.Tensor, scale_in, scale_out, zero_point_out: int) -> torch.Tensor:
    """ORT's QLinearGlobalAveragePool (MLAS, x86-64) on input levels, as output levels.

    Args:
        levels: input levels (codes minus the input zero point), float (N, C, H, W).
        scale_in: input scale.
        scale_out: output scale.
        zero_point_out: output zero point.

    Returns:
        float32 output levels (N, C, 1, 1), before any low-bit clip.
    """
    size = levels.shape[-1] * levels.shape[-2]
    mult = np.float32(_f32(scale_in) / np.float32(_f32(scale_out) * np.float32(size)))
    acc = levels.to(torch.float64).sum(dim=(-2, -1), keepdim=True)  # exact: integers below 2^53
    return requantize_levels(acc, torch.tensor(float(mult), dtype=torch.float32), zero_point_out)


def qlinear_add_codes(a: torch.Tensor, b: torch.Tensor, scale_a, zp_a: int, scale_b, zp_b: int,
                      scale_c, zp_c: int) -> torch.Tensor:
    """ORT's QLinearAdd on x86-64 (MLAS AVX2 kernel) for uint8 codes of the same shape.

    ``fma`` is emulated in float64: the product of an 8-bit code and a float32 ratio is exact there, and so is
    the sum for ratios within a factor of about 2^20 of each other; one rounding to float32 then gives the
    correctly rounded fma.

    Args:
        a: codes of input A (0..255, any dtype).
        b: codes of input B.
        scale_a: scale of A (float32 value).
        zp_a: zero point of A.
        scale_b: scale of B.
        zp_b: zero point of B.
        scale_c: scale of the output.
        zp_c: zero point of the output.

    Returns:
        float32 output codes (0..255).
    """
    sc = _f32(scale_c)
    ra, rb = np.float32(_f32(scale_a) / sc), np.float32(_f32(scale_b) / sc)
    # The zero-point terms are folded into one float32 constant before the loop, as the kernel does.
    zero_terms = np.float32(np.float32(ra * np.float32(zp_a)) + np.float32(rb * np.float32(zp_b)))
    fixed = np.float32(np.float32(zp_c) - zero_terms)
    t = (b.to(torch.float64) * float(rb) + float(fixed)).to(torch.float32)
    r = (a.to(torch.float64) * float(ra) + t.to(torch.float64)).to(torch.float32)
    return torch.clamp(torch.round(r), 0.0, 255.0)  # cvtps2dq, then packs/packus saturation


def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """ORT's float GlobalAveragePool (MlasPoolGlobalKernel) in its summation order.

    Args:
        x: float32 (N, C, H, W).

    Returns:
        float32 (N, C, 1, 1).
    """
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    size = flat.shape[-1]
    k = size // 4
    lanes = torch.zeros(n, c, 4, dtype=x.dtype)
    for i in range(k):  # lane j sums elements j, j+4, j+8, ... in order
        lanes = lanes + flat[..., 4 * i: 4 * i + 4]
    total = (lanes[..., 0] + lanes[..., 2]) + (lanes[..., 1] + lanes[..., 3])
    for i in range(4 * k, size):
        total = total + flat[..., i]
    return (total / torch.full_like(total, float(size))).reshape(n, c, 1, 1)


def _is_plain_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    mod = graph_ops.target_module(gm, node)
    if mod is not None:
        return type(mod) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.ops.aten.relu.default)
    return node.op == "call_method" and node.target == "relu"


_ADAPTIVE_AVG_FUNCS = (F.adaptive_avg_pool2d, torch.ops.aten.adaptive_avg_pool2d.default,
                       torch.ops.aten._adaptive_avg_pool2d.default)


def _is_global_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    """adaptive_avg_pool2d to 1x1 (exported as GlobalAveragePool; avg_pool2d exports as AveragePool)."""
    mod = graph_ops.target_module(gm, node)
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        size = mod.output_size
    elif node.op == "call_function" and node.target in _ADAPTIVE_AVG_FUNCS:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    else:
        return False
    return size in (1, (1, 1), [1, 1])


class OrtIntegerArithmetic:
    """Which nodes of a QuantSim graph ONNX Runtime fuses into integer kernels, and how to compute them.

    Args:
        sim: a QuantSim whose plan targets onnxruntime.
    """

    name = ARITHMETIC_NAME

    def __init__(self, sim, pair_saturation: bool | None = None):
        if sim.plan.target != "onnxruntime":
            raise QexportError(f"onnxruntime integer arithmetic needs an onnxruntime plan, not {sim.plan.target!r}")
        gm = sim.gm
        aq_of = {n: m for n in gm.graph.nodes if isinstance(m := graph_ops.target_module(gm, n), ActQuantizer)}
        self.layers: dict[fx.Node, tuple] = {}  # node -> (layer, input quantizer, output quantizer or None)
        self.adds: dict[fx.Node, tuple] = {}  # node -> (quantizer of A, of B, of the output)
        self.pools: set[fx.Node] = set()
        self.qpools: dict[fx.Node, tuple] = {}  # node -> (input quantizer, output quantizer)
        # this CPU's u8s8 kernels saturate int16 pair sums (None: ask them)
        self.pair_saturation = pairs_saturate("onnxruntime") if pair_saturation is None else pair_saturation
        for n in gm.graph.nodes:
            mod = graph_ops.target_module(gm, n)
            if isinstance(mod, (QuantConv2d, QuantLinear)):
                in_aq = aq_of.get(n.args[0]) if n.args else None
                if in_aq is None or in_aq is not mod.input_quantizer:
                    continue
                out_aq = self._fused_output(gm, n, aq_of)
                # A conv without a Q after it runs in float; a Gemm becomes QGemm with a float output.
                if out_aq is not None or isinstance(mod, QuantLinear):
                    self.layers[n] = (mod, in_aq, out_aq)
            elif graph_ops.is_residual_add(n) and all(a in aq_of for a in n.args[:2]):
                out_aq = self._fused_output(gm, n, aq_of)
                if out_aq is not None:
                    self.adds[n] = (aq_of[n.args[0]], aq_of[n.args[1]], out_aq)
            elif _is_global_pool(gm, n):
                in_aq = aq_of.get(n.args[0])
                out_aq = self._fused_output(gm, n, aq_of) if in_aq is not None else None
                if out_aq is not None:
                    self.qpools[n] = (in_aq, out_aq)
                else:
                    self.pools.add(n)

    @staticmethod
    def _fused_output(gm: fx.GraphModule, node: fx.Node, aq_of: dict) -> ActQuantizer | None:
        """The quantizer ORT fuses into ``node``'s kernel: its only consumer, possibly behind a removable Relu."""
        users = list(node.users)
        if len(users) != 1:
            return None
        user, via_relu = users[0], False
        if user not in aq_of:
            if not _is_plain_relu(gm, user) or len(user.users) != 1:
                return None
            user, via_relu = next(iter(user.users)), True
            if user not in aq_of:
                return None
        aq = aq_of[user]
        zp, _ = ort_encoding(aq.incoming()[1])  # an aligned point's incoming codes are the kernel's output
        if via_relu and zp != 0:  # ORT drops a Relu only before zero point 0
            return None
        return aq

    def summary(self) -> dict:
        """Counts of the emulated kernels (for reports and tests)."""
        q = sum(1 for v in self.layers.values() if v[2] is not None)
        return {"requantized_layers": q, "float_output_gemms": len(self.layers) - q, "qlinear_adds": len(self.adds),
                "global_pools": len(self.pools), "qlinear_global_pools": len(self.qpools)}

    def layer(self, node: fx.Node, x: torch.Tensor) -> torch.Tensor | None:
        """QLinearConv / QGemm of a fused layer; None when a quantizer is off (then QuantSim's own forward runs).

        Args:
            node: the layer's graph node.
            x: its (fake-quantized) float32 input.

        Returns:
            The dequantized output codes (or QGemm's float output).
        """
        mod, in_aq, out_aq = self.layers[node]
        if not (in_aq.enabled and mod.weight_quantizer.enabled and (out_aq is None or out_aq.enabled)):
            return None
        if isinstance(mod, QuantConv2d) and mod.padding_mode != "zeros":
            return None
        if isinstance(mod, QuantLinear) and x.dim() != 2:  # exported as MatMul, not Gemm: not emulated
            return None
        s_in = in_aq.scale.detach().to(torch.float32)
        s_w = mod.weight_quantizer.scale.detach().to(torch.float32)
        levels = torch.round(x / s_in).to(torch.float64)
        w = mod.int_weight().to(torch.float64)
        conv = mod if isinstance(mod, QuantConv2d) else None
        acc = mod._conv_forward(levels, w, None) if conv is not None else F.linear(levels, w)
        if self.pair_saturation:  # the kernel multiplies the raw uint8 codes: level plus zero point
            zp_in = ort_encoding(in_aq.spec)[0]
            corr = saturation_correction(levels + zp_in, w, conv, PAD_CODE["onnxruntime"](zp_in),
                                         PAIR_ORDER["onnxruntime"])
            acc = acc if corr is None else acc + corr
        shape = (1, -1) + (1,) * (acc.dim() - 2)
        bias_scale = s_in * s_w  # float32, as the exporter's bias grid and ORT's x_scale * w_scale
        if mod.bias is not None:
            qb = torch.clamp(torch.round(mod.bias.detach() / bias_scale), _INT32_MIN, _INT32_MAX)
            acc = acc + qb.to(torch.float64).view(shape)
        if out_aq is None:  # QGemm with a float output
            return acc.to(torch.float32) * bias_scale.view(shape)
        s_out, out_spec = out_aq.incoming()  # an aligned point's incoming codes are the kernel's output
        s_out = s_out.detach().to(torch.float32)
        zp, _ = ort_encoding(out_spec)
        return clamp_to_grid(requantize_levels(acc, (bias_scale / s_out).view(shape), zp), out_spec) * s_out

    def add(self, node: fx.Node, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """QLinearAdd of a fused residual add; None when a quantizer is off.

        Args:
            node: the add's graph node.
            a: first input (dequantized codes of its quantizer).
            b: second input.

        Returns:
            The dequantized output codes.
        """
        qa, qb, qc = self.adds[node]
        if not (qa.enabled and qb.enabled and qc.enabled):
            return None
        (za, _), (zb, _), (zc, _) = ort_encoding(qa.spec), ort_encoding(qb.spec), ort_encoding(qc.spec)
        sa, sb, sc = (q.scale.detach().to(torch.float32) for q in (qa, qb, qc))
        ca = torch.round(a / sa) + za
        cb = torch.round(b / sb) + zb
        return clamp_to_grid(qlinear_add_codes(ca, cb, sa, za, sb, zb, sc, zc) - zc, qc.spec) * sc

    def pool(self, node: fx.Node, x: torch.Tensor) -> torch.Tensor | None:
        """QLinearGlobalAveragePool of a fused pool; None when a quantizer is off.

        Args:
            node: the pool's graph node.
            x: its input (dequantized codes of its quantizer).

        Returns:
            The dequantized output codes.
        """
        qi, qo = self.qpools[node]
        if not (qi.enabled and qo.enabled):
            return None
        si, so = (q.scale.detach().to(torch.float32) for q in (qi, qo))
        out = qlinear_global_average_pool(torch.round(x / si), si, so, ort_encoding(qo.spec)[0])
        return clamp_to_grid(out, qo.spec) * so

    def run(self, sim, x: torch.Tensor) -> torch.Tensor:
        """Run QuantSim's graph with the engine's arithmetic at the fused nodes.

        Args:
            sim: the QuantSim this was built from.
            x: float32 input batch.

        Returns:
            The output logits.
        """
        return _EngineInterpreter(sim.gm, self).run(x)


class _EngineInterpreter(fx.Interpreter):
    """Runs the graph node by node; fused nodes take the engine's arithmetic (module hooks still fire)."""

    def __init__(self, gm: fx.GraphModule, arith: OrtIntegerArithmetic):
        super().__init__(gm)
        self.arith = arith

    def run_node(self, n: fx.Node):
        a = self.arith
        if n in a.layers or n in a.adds or n in a.pools or n in a.qpools:
            args, _ = self.fetch_args_kwargs_from_env(n)
            if n in a.layers:
                out = a.layer(n, args[0])
            elif n in a.adds:
                out = a.add(n, args[0], args[1])
            elif n in a.qpools:
                out = a.pool(n, args[0])
            else:
                out = global_average_pool(args[0]) if args[0].dtype == torch.float32 else None
            if out is not None:
                return out
        return super().run_node(n)


def emulated_here() -> bool:
    """True on x86-64, the CPUs whose ONNX Runtime kernels this module emulates."""
    return platform.machine().lower() in _X86


def engine_arithmetic(sim, kind: str, pair_saturation: bool | None = None) -> OrtIntegerArithmetic:
    """Build the engine-arithmetic emulation ``kind`` for a QuantSim.

    Args:
        sim: the QuantSim.
        kind: ``"onnxruntime"`` (the only engine emulated).
        pair_saturation: emulate the int16 pair saturation of CPUs without VNNI; None asks this CPU's kernels.

    Returns:
        The emulation, to be stored on the QuantSim.
    """
    if kind != "onnxruntime":
        raise QexportError(f"no integer arithmetic emulation for {kind!r}; only 'onnxruntime'")
    if not emulated_here():
        raise QexportError(f"onnxruntime integer arithmetic is emulated for x86-64 only, not {platform.machine()}")
    return OrtIntegerArithmetic(sim, pair_saturation)
