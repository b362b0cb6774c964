"""The int16 pair saturation of int8 kernels on x86 CPUs without VNNI (qexport/quant/u8s8_saturation.py).

On a CPU with VNNI or AMX nothing saturates and these tests check that the exact reference holds; on one without
(CI has had both kinds) they check that the emulation reproduces the real kernels code for code. ONNX Runtime's
QLinearConv is covered in test_engine_arith.py; here: the probes, OpenVINO's pair order on a real compiled conv
and gemm, and the float reference against the integer one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from conftest import ConvGeometry
from qexport.quant.u8s8_saturation import pairs_saturate, saturation_correction, saturation_note


def test_probes_answer_for_each_runtime():
    """Both probes run on this CPU and agree (both kernels pair with vpmaddubsw exactly when VNNI is missing)."""
    pytest.importorskip("openvino")
    assert pairs_saturate("onnxruntime") == pairs_saturate("openvino")
    assert pairs_saturate("tensorrt") is False
    note = saturation_note([8, 4], "openvino")
    assert (note is not None) == pairs_saturate("openvino")
    assert saturation_note([7, 4], "openvino") is None  # 7-bit weights never saturate


def test_channel_order_equals_pairwise_sums():
    """OpenVINO's order: neighbouring input channels at each kernel position, an odd channel count padded."""
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.integers(0, 256, (2, 3, 5, 5)).astype(np.float64))
    w = torch.from_numpy(rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.float64))
    corr = saturation_correction(x, w, ConvGeometry(), pad_code=0, order="channel")
    xp = F.pad(x, (1, 1, 1, 1))
    for n, o, i, j in [(0, 0, 0, 0), (1, 3, 2, 4), (0, 2, 4, 1), (1, 1, 3, 3)]:
        prods = torch.cat([xp[n, :, i:i + 3, j:j + 3] * w[o], torch.zeros(1, 3, 3, dtype=torch.float64)])
        pairs = (prods[0::2] + prods[1::2]).reshape(-1).tolist()
        want = sum(min(max(p, -32768.0), 32767.0) - p for p in pairs)
        assert float(corr[n, o, i, j]) == want
    position = saturation_correction(x, w, ConvGeometry(), pad_code=0, order="position")
    assert not torch.equal(corr, position)  # with 3 channels the two orders pair different products


SX, SW = 2.0**-4, 2.0**-7  # powers of two: the float requantization is exact, only the sums can differ


def _saturating_weights(rng, shape) -> np.ndarray:
    """Random int8 weights, half of them at +-127, so that many neighbouring pairs exceed the int16 range."""
    w = rng.integers(-127, 128, shape)
    return np.where(rng.random(shape) < 0.5, np.where(w < 0, -127, 127), w).astype(np.int8)


def _high_codes(rng, shape) -> np.ndarray:
    """Random uint8 codes, 40 % of them 255."""
    return np.where(rng.random(shape) < 0.4, 255, rng.integers(0, 256, shape))


def _openvino_int8_codes(ov, compute: str, w: np.ndarray, codes: np.ndarray, x_zp: int, **attrs) -> np.ndarray:
    """Run ``Q -> DQ -> compute(DQ(int8 w)) -> Q -> DQ`` (one int8 kernel in OpenVINO) on ``codes`` and return the
    output levels (output scale 1)."""
    def const(name, value, dtype):
        return numpy_helper.from_array(np.array(value, dtype), name)

    init = [numpy_helper.from_array(w, "w"), const("sw", SW, np.float32), const("zw", 0, np.int8),
            const("sx", SX, np.float32), const("zx", x_zp, np.uint8), const("sy", 1.0, np.float32),
            const("zy", 128, np.uint8)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"]),
             helper.make_node(compute, ["xd", "wd"], ["c"], **attrs),
             helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "sy", "zy"], ["y"])]
    graph = helper.make_graph(nodes, f"qdq_{compute}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(codes.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    return np.round(compiled({"x": ((codes - x_zp) * SX).astype(np.float32)})[0])


def _emulated_codes(acc: torch.Tensor, corr: torch.Tensor | None) -> np.ndarray:
    """The exact accumulators plus, where this CPU's OpenVINO kernels saturate, the correction, requantized."""
    assert corr is not None and float(corr.abs().max()) > 0  # these weights do saturate pairs
    if pairs_saturate("openvino"):
        acc = acc + corr
    return torch.clamp(torch.round(acc * np.float32(SX * SW)), -128, 127).numpy()


@pytest.mark.parametrize("cin,x_zp", [(3, 128), (16, 0), (16, 128), (5, 0)])
def test_openvino_int8_conv_matches_the_emulation(cin, x_zp):
    """A real OpenVINO int8 conv, code for code: exact accumulators plus, where this CPU saturates, the channel-pair
    correction on the raw codes (level plus zero point; a padded position multiplies 0)."""
    ov = pytest.importorskip("openvino")
    rng = np.random.default_rng(cin + x_zp)
    w, codes = _saturating_weights(rng, (8, cin, 3, 3)), _high_codes(rng, (2, cin, 7, 7))
    got = _openvino_int8_codes(ov, "Conv", w, codes, x_zp, pads=[1, 1, 1, 1])
    ct, wt = torch.from_numpy(codes.astype(np.float64)), torch.from_numpy(w.astype(np.float64))
    corr = saturation_correction(ct, wt, ConvGeometry(), pad_code=0, order="channel")
    np.testing.assert_array_equal(got, _emulated_codes(F.conv2d(ct - x_zp, wt, padding=1), corr))


def test_float_reference_saturates_like_the_integer_one(tiny_recipe, tiny_images):
    """On any CPU: the float QuantSim with ONNX Runtime's pair saturation lands where the integer emulation with
    the saturation does, and both move away from the exact results (the saturation forced on)."""
    from qexport.data import ImageFolder
    from qexport.models import Preprocess
    from qexport.quant.engine_arith import emulated_here
    from qexport.recipe import QuantRecipe

    if not emulated_here():
        pytest.skip("ONNX Runtime's x86-64 integer arithmetic is the one emulated")
    rec = QuantRecipe.load(tiny_recipe)
    ds = ImageFolder(tiny_images, Preprocess.from_dict(rec.model.preprocess))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        exact = rec.build_quantsim().set_exact_accumulation(True)(x)
        saturating_sim = rec.build_quantsim().set_exact_accumulation(True).set_pair_saturation("onnxruntime")
        assert saturating_sim.arithmetic == "float64-accumulation+pair-saturation"
        floated = saturating_sim(x)
        integer = rec.build_quantsim().set_engine_arithmetic("onnxruntime", pair_saturation=True)(x)
        integer_exact = rec.build_quantsim().set_engine_arithmetic("onnxruntime", pair_saturation=False)(x)
    moved = float((integer - integer_exact).abs().mean())
    assert moved > 0.01, "the tiny recipe's 8-bit weights saturate some pairs"
    assert float((floated - exact).abs().mean()) > 0.5 * moved
    assert float((floated - integer).abs().mean()) < 0.2 * moved


def test_openvino_int8_gemm_matches_the_emulation():
    """A real OpenVINO int8 Gemm (a classifier), code for code: pairs of neighbouring features where this CPU
    saturates them."""
    ov = pytest.importorskip("openvino")
    rng = np.random.default_rng(3)
    w, codes = _saturating_weights(rng, (10, 64)), _high_codes(rng, (16, 64))
    got = _openvino_int8_codes(ov, "Gemm", w, codes, 0, transB=1)
    ct, wt = torch.from_numpy(codes.astype(np.float64)), torch.from_numpy(w.astype(np.float64))
    corr = saturation_correction(ct, wt, None, pad_code=0, order="channel")
    np.testing.assert_array_equal(got, _emulated_codes(F.linear(ct, wt), corr))
