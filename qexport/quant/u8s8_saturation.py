"""The int16 pair saturation of int8 CPU kernels on x86 without VNNI (ONNX Runtime, OpenVINO), for verification.

Without VNNI (AVX-512 VNNI or AVX-VNNI), both runtimes multiply uint8 activations by int8 weights with
``vpmaddubsw``: the products of two neighbouring reduction elements are added and *saturated to int16* before
``vpmaddwd`` widens them into the int32 accumulator. With 8-bit weights a pair can exceed 32767
(255 * 127 * 2 = 64770), so the engine's accumulator differs from the exact sum. With VNNI (``vpdpbusd``) or AMX
the products are summed in int32 and nothing saturates. A pair can only saturate when ``|w_k| + |w_k+1| > 128``
(255 * 128 < 32767), so weights of 7 bits or fewer never do.

Which elements pair, measured under an AVX2-only CPU (an AMD EPYC; QEMU's ``-cpu max``), by the probes in
tests/test_engine_arith.py and tests/test_pair_saturation.py: ONNX Runtime 1.32 (QLinearConv) pairs neighbours of
its NHWC im2col order (kernel position, then input channel, flattened) and multiplies a padded position's zero-
point code; OpenVINO 2026.4 pairs neighbouring input channels at each kernel position (channels padded to an even
count) and multiplies a padded position by 0. Both multiply the raw uint8 codes (level plus zero point) and correct
the zero point after the sum. Whether this machine's kernels saturate is asked of the kernels themselves
(``pairs_saturate``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

_INT16_MIN, _INT16_MAX = -32768.0, 32767.0
_PAIR_LIMIT = 128  # |w_k| + |w_k+1| above this can saturate with uint8 activations (255 * 129 > 32767)


# Which reduction elements a runtime's kernels pair (measured on an AVX2-only CPU: QLinearConv in ONNX Runtime 1.32,
# OpenVINO 2026.4's CPU plugin), see _reduction_columns.
PAIR_ORDER = {"onnxruntime": "position", "openvino": "channel"}
# The raw code a runtime multiplies at a padded position, given the input zero point.
PAD_CODE = {"onnxruntime": lambda zero_point: zero_point, "openvino": lambda zero_point: 0}
# The probe: 16 channels of 3x3, every code 255, every weight 127. The exact accumulator 4,663,440 gives code 71 at
# an output scale of 65536; int16 pair sums (72 x 32767) give 36.
_PROBE_CODE, _PROBE_WEIGHT, _PROBE_Y_SCALE, _PROBE_EXACT = 255, 127, 65536.0, 71


def _probe_model_bytes(qdq: bool) -> bytes:
    """The probe as one QLinearConv node (ONNX Runtime) or as Q -> DQ -> Conv -> Q -> DQ (OpenVINO's int8 conv)."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value, dtype):
        return numpy_helper.from_array(np.array(value, dtype), name)

    init = [numpy_helper.from_array(np.full((1, 16, 3, 3), _PROBE_WEIGHT, np.int8), "w"),
            const("s", 1.0, np.float32), const("ys", _PROBE_Y_SCALE, np.float32),
            const("zx", 0, np.uint8), const("zw", 0, np.int8), const("zy", 0, np.uint8)]
    if qdq:
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zx"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "zx"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["w", "s", "zw"], ["wd"]),
                 helper.make_node("Conv", ["xd", "wd"], ["c"]),
                 helper.make_node("QuantizeLinear", ["c", "ys", "zy"], ["cq"]),
                 helper.make_node("DequantizeLinear", ["cq", "ys", "zy"], ["y"])]
        x_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    else:
        nodes = [helper.make_node("QLinearConv", ["x", "s", "zx", "w", "s", "zw", "ys", "zy"], ["y"])]
        x_type, y_type = TensorProto.UINT8, TensorProto.UINT8
    graph = helper.make_graph(nodes, "pair_saturation_probe",
                              [helper.make_tensor_value_info("x", x_type, [1, 16, 3, 3])],
                              [helper.make_tensor_value_info("y", y_type, [1, 1, 1, 1])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _probe_onnxruntime() -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(_probe_model_bytes(qdq=False), opts, providers=["CPUExecutionProvider"])
    return float(sess.run(None, {"x": np.full((1, 16, 3, 3), _PROBE_CODE, np.uint8)})[0].flat[0])


def _probe_openvino() -> float:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(_probe_model_bytes(qdq=True), b"")
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    y = compiled({"x": np.full((1, 16, 3, 3), _PROBE_CODE, np.float32)})[0]
    return float(y.flat[0]) / _PROBE_Y_SCALE


@functools.lru_cache(maxsize=None)
def pairs_saturate(runtime: str) -> bool:
    """Whether a runtime's int8 kernels on this CPU saturate int16 sums of product pairs (x86 without VNNI).

    Asks the kernel itself rather than the CPU flags: a one-conv model whose exact and saturated results differ.
    That also holds under an emulator or a hypervisor that hides features the flags still list.

    Args:
        runtime: ``onnxruntime`` or ``openvino`` (any other runtime: False).

    Returns:
        Whether QuantSim should emulate the saturation for that runtime's engines here.
    """
    probes = {"onnxruntime": _probe_onnxruntime, "openvino": _probe_openvino}
    if runtime not in probes:
        return False
    try:
        return round(probes[runtime]()) != _PROBE_EXACT
    except Exception:  # not installed, or no CPU device: there is no engine here to emulate
        return False


def _reduction_columns(codes: torch.Tensor, weight: torch.Tensor, conv, pad_code: int, order: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations as (N, K, L) columns and weights as (O, K), ordered so that the kernel's pairs are (2i, 2i+1).

    ``"position"`` (ONNX Runtime): kernel position, then input channel, flattened, padded at the end.
    ``"channel"`` (OpenVINO / oneDNN): pairs of neighbouring input channels at each kernel position, the
    channels padded to an even count.
    """
    if conv is None:  # a Gemm: K is the feature axis
        return codes.unsqueeze(-1), weight
    n, c = codes.shape[:2]
    o, _, kh, kw = weight.shape
    ph, pw = conv.padding
    padded = F.pad(codes, (pw, pw, ph, ph), value=float(pad_code))
    cols = F.unfold(padded, (kh, kw), dilation=conv.dilation, stride=conv.stride).view(n, c, kh * kw, -1)
    wk = weight.reshape(o, c, kh * kw)
    if order == "channel" and c % 2:
        cols, wk = F.pad(cols, (0, 0, 0, 0, 0, 1)), F.pad(wk, (0, 0, 0, 1))
    cols = cols.transpose(1, 2).reshape(n, -1, cols.shape[-1])
    return cols, wk.transpose(1, 2).reshape(o, -1)


def saturation_correction(codes: torch.Tensor, weight: torch.Tensor, conv=None, pad_code: int = 0,
                          order: str = "position") -> torch.Tensor | None:
    """What the saturated int16 pair sums add to the exact accumulators (zero where nothing saturates).

    Args:
        codes: the raw uint8 input codes (level plus zero point), float64, (N, C, H, W) or (N, K).
        weight: the integer weights, float64, (O, C, kh, kw) or (O, K).
        conv: the QuantConv2d (padding, stride, dilation; groups must be 1), None for a Gemm.
        pad_code: the raw code the kernel multiplies at a padded position (ONNX Runtime: the zero point;
            OpenVINO: 0).
        order: which reduction elements form a pair: ``"position"`` (ONNX Runtime) or ``"channel"`` (OpenVINO).

    Returns:
        float64 corrections shaped like the layer's output, or None when no pair of these weights can saturate
        (or the conv is grouped, which this does not model).
    """
    if conv is not None and (conv.groups != 1 or isinstance(conv.padding, str)):
        return None
    cols, wk = _reduction_columns(codes, weight, conv, pad_code, order)
    if wk.shape[1] % 2:  # the packed K is padded with zeros
        cols, wk = F.pad(cols, (0, 0, 0, 1)), F.pad(wk, (0, 1))
    w_even, w_odd = wk[:, 0::2], wk[:, 1::2]
    risky = (w_even.abs() + w_odd.abs()) > _PAIR_LIMIT
    if not bool(risky.any()):
        return None
    c_even, c_odd = cols[:, 0::2], cols[:, 1::2]
    corr = torch.zeros(cols.shape[0], wk.shape[0], cols.shape[2], dtype=torch.float64)
    for o in torch.nonzero(risky.any(dim=1)).flatten().tolist():
        idx = torch.nonzero(risky[o]).flatten()
        pair = c_even[:, idx] * w_even[o, idx, None] + c_odd[:, idx] * w_odd[o, idx, None]
        corr[:, o] = (pair.clamp(_INT16_MIN, _INT16_MAX) - pair).sum(dim=1)
    if conv is None:
        return corr.squeeze(-1)
    n = codes.shape[0]
    h_out = (codes.shape[2] + 2 * conv.padding[0] - conv.dilation[0] * (weight.shape[2] - 1) - 1) // conv.stride[0] + 1
    return corr.view(n, wk.shape[0], h_out, -1)


def saturation_note(weight_bits: list[int], runtime: str = "onnxruntime") -> str | None:
    """A sentence for verify's report when this CPU's int8 kernels saturate and some weights can hit it.

    Args:
        weight_bits: the weight width of every layer of the plan.
        runtime: the engine's runtime.

    Returns:
        The note, or None when nothing can saturate here.
    """
    if max(weight_bits, default=0) < 8 or not pairs_saturate(runtime):
        return None
    return (f"this CPU has no VNNI, so {runtime}'s int8 kernels saturate int16 sums of product pairs with 8-bit "
            "weights (QuantSim's reference emulates it; the float QuantSim does not); an engine meant for such CPUs "
            "keeps its accuracy with 7-bit weights (--bits w7a8)")
