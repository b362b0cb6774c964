"""QuantSim with ONNX Runtime's integer arithmetic (qexport/quant/engine_arith.py) against real ORT sessions.

- the QLinearAdd formula equals a real com.microsoft.QLinearAdd node on every pair of uint8 codes;
- the requantization of exact accumulators equals a real QLinearConv node (im2col path and ConvSym path), with
  the int16 pair saturation of u8s8 kernels on CPUs without VNNI;
- a small residual model's emulated QuantSim equals its ORT engine bit for bit (W8A8, W4A8, W4A4), and verify
  says so;
- ResNet-20 W8A8 (shared folder): bit-exact logits on a test-dev subset;
- the mode is off by default and refused for other plans.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from conftest import ConvGeometry
from qexport.errors import QexportError
from qexport.quant.engine_arith import emulated_here, qlinear_add_codes, requantize_levels
from qexport.quant.u8s8_saturation import pairs_saturate, saturation_correction
from qexport.recipe import QuantRecipe
from qexport.runtimes.onnxrt import session_for
from tests_support.models import PREPROCESS

pytestmark = pytest.mark.skipif(not emulated_here(), reason="ONNX Runtime's x86-64 kernels are the ones emulated")


def _save(tmp_path, nodes, inputs, outputs, inits, name):
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    return path


# ---------------------------------------------------------------- kernels
@pytest.mark.parametrize("zps,seed", [((128, 0, 0), 0), ((0, 0, 0), 1), ((128, 128, 128), 2), ((0, 128, 0), 3),
                                      ((17, 200, 99), 4), ((128, 0, 0), None)])
def test_qlinear_add_matches_ort_node(tmp_path, zps, seed):
    """Every pair of codes (65,536 values, plus a tail that is not a multiple of the vector width).

    Random scales, and (seed None) scale ratios of about 0.1, where a tenth of the sums lie within float rounding
    of a rounding tie, so the kernel's float32 steps show.
    """
    if seed is None:
        sa, sb, sc = np.float32(0.002), np.float32(0.002), np.float32(0.02)
    else:
        sa, sb, sc = (np.float32(v) for v in 0.02 * np.exp(np.random.default_rng(seed).uniform(-1, 1, 3)))
    za, zb, zc = zps
    a = np.repeat(np.arange(256, dtype=np.uint8), 256)
    b = np.tile(np.arange(256, dtype=np.uint8), 256)
    a, b = np.concatenate([a, a[:37]]), np.concatenate([b, b[::-1][:37]])
    inits = {"sa": np.array(sa), "za": np.array(za, np.uint8), "sb": np.array(sb), "zb": np.array(zb, np.uint8),
             "sc": np.array(sc), "zc": np.array(zc, np.uint8)}
    node = helper.make_node("QLinearAdd", ["A", "sa", "za", "B", "sb", "zb", "sc", "zc"], ["C"], domain="com.microsoft")
    io = [helper.make_tensor_value_info(n, TensorProto.UINT8, [len(a)]) for n in ("A", "B", "C")]
    path = _save(tmp_path, [node], io[:2], io[2:], inits, "qladd")
    got = session_for(path, threads=1, optimize=False).run(None, {"A": a, "B": b})[0]
    want = qlinear_add_codes(torch.from_numpy(a), torch.from_numpy(b), sa, za, sb, zb, sc, zc).numpy()
    np.testing.assert_array_equal(got, want.astype(np.uint8))
    if seed is None:  # rounding the exact sum would not do: the emulation follows the kernel's float32 steps
        exact = ((a.astype(np.float64) - za) * float(sa) + (b.astype(np.float64) - zb) * float(sb)) / float(sc)
        assert (np.clip(np.round(exact) + zc, 0, 255) != got).sum() >= 100  # 151 of 65,573 here


@pytest.mark.parametrize("cin,zp_x,zp_y,stride", [(3, 128, 0, 1), (16, 0, 128, 1), (32, 0, 0, 1), (16, 128, 0, 2)])
def test_requantization_matches_qlinearconv_node(tmp_path, cin, zp_x, zp_y, stride):
    """A real QLinearConv (3 input channels: im2col + MlasRequantizeOutput; 16/32: the ConvSym kernels); on a CPU
    without VNNI the int16 pair saturation of its u8s8 kernels is part of the model (random 8-bit weights hit it)."""
    rng = np.random.default_rng(cin)
    cout = 16
    x = rng.integers(0, 256, (4, cin, 9, 9), dtype=np.uint8)
    w = rng.integers(-127, 128, (cout, cin, 3, 3), dtype=np.int8)
    bias = rng.integers(-3000, 3000, cout).astype(np.int32)
    sx, sy = np.float32(0.021), np.float32(0.35 if zp_y else 0.5)
    sw = (0.002 * np.exp(rng.uniform(-0.5, 0.5, cout))).astype(np.float32)
    inits = {"sx": np.array(sx), "zx": np.array(zp_x, np.uint8), "w": w, "sw": sw, "zw": np.zeros(cout, np.int8),
             "sy": np.array(sy), "zy": np.array(zp_y, np.uint8), "bias": bias}
    node = helper.make_node("QLinearConv", ["X", "sx", "zx", "w", "sw", "zw", "sy", "zy", "bias"], ["Y"],
                            pads=[1, 1, 1, 1], strides=[stride, stride])
    path = _save(tmp_path, [node], [helper.make_tensor_value_info("X", TensorProto.UINT8, list(x.shape))],
                 [helper.make_tensor_value_info("Y", TensorProto.UINT8, None)], inits, "qconv")
    got = session_for(path, threads=1, optimize=False).run(None, {"X": x})[0]
    xt, wt = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64))
    acc = F.conv2d(xt - zp_x, wt, padding=1, stride=stride)
    acc = acc + torch.from_numpy(bias.astype(np.float64)).view(1, -1, 1, 1)
    corr = saturation_correction(xt, wt, ConvGeometry(stride), zp_x)
    assert corr is not None and float(corr.abs().max()) > 0  # these weights can saturate a pair
    if pairs_saturate("onnxruntime"):
        acc = acc + corr
    mult = torch.from_numpy((sx * sw) / sy).view(1, -1, 1, 1)
    want = requantize_levels(acc, mult, zp_y).numpy() + zp_y
    np.testing.assert_array_equal(got, want.astype(np.uint8))


def test_saturation_correction_equals_pairwise_sums():
    """The correction equals brute force: products in (kh, kw, c) order, neighbour pairs clamped to int16."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.integers(0, 256, (2, 3, 5, 5)).astype(np.float64))
    w = torch.from_numpy(rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.float64))
    corr = saturation_correction(x, w, ConvGeometry(1), pad_code=7)
    xp = F.pad(x, (1, 1, 1, 1), value=7.0)
    for n, o, i, j in [(0, 0, 0, 0), (1, 3, 2, 4), (0, 2, 4, 1), (1, 1, 3, 3)]:
        prods = (xp[n, :, i:i + 3, j:j + 3] * w[o]).permute(1, 2, 0).reshape(-1).tolist() + [0.0]  # K = 27: pad
        pairs = [prods[k] + prods[k + 1] for k in range(0, 28, 2)]
        want = sum(min(max(p, -32768.0), 32767.0) - p for p in pairs)
        assert float(corr[n, o, i, j]) == want
    assert saturation_correction(x, torch.clamp(w, -64, 64), ConvGeometry(1)) is None  # 7-bit: never saturates


# ---------------------------------------------------------------- whole models
def _engine_for(tmp_path, recipe_dir):
    from qexport.build_engine import build_engine_folder
    from qexport.export.qdq import export_recipe

    qdq, _, _ = export_recipe(recipe_dir, "onnxruntime", tmp_path / "model.onnx")
    return build_engine_folder(qdq, tmp_path / "engine", "onnxruntime", threads=2)


def _compare(engine_dir, recipe_dir, x):
    from qexport.runtimes import load_engine

    eng = load_engine(engine_dir, "int8", 2).infer(x.numpy().astype(np.float32))
    sim = QuantRecipe.load(recipe_dir).build_quantsim().set_exact_accumulation(True)
    with torch.no_grad():
        flt = sim(x).numpy()
        emu = sim.set_engine_arithmetic("onnxruntime")(x).numpy()
    return eng, emu, flt, sim


class ResidualNet(nn.Module):
    """conv-BN-ReLU (3->16), two residual blocks of 16 channels (the first one's sum feeds a conv, so ORT fuses
    that Add into QLinearAdd), global pool, linear: 3x16x16 -> 4 classes."""

    qexport_preprocess = PREPROCESS

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.convs = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1) for _ in range(4))
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for i in (0, 2):
            x = F.relu(self.convs[i + 1](F.relu(self.convs[i](x))) + x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def residual_net() -> ResidualNet:
    """Factory ``test_engine_arith:residual_net`` (seeded random weights)."""
    torch.manual_seed(0)
    return ResidualNet()


@pytest.fixture(scope="module", params=["w8a8", "w4a8", "w4a4"])
def residual_recipe(request, tmp_path_factory, tiny_images):
    from qexport.calibrate import CalibrateConfig, calibrate

    out = tmp_path_factory.mktemp(f"residual_{request.param}") / "recipe"
    return calibrate(CalibrateConfig(model="test_engine_arith:residual_net", output=out, method="minmax",
                                     bits=request.param, data=str(tiny_images), num_samples=24, quiet=True))


def test_small_model_bit_exact_with_engine(tmp_path, residual_recipe):
    engine_dir = _engine_for(tmp_path, residual_recipe)
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.5
    eng, emu, flt, sim = _compare(engine_dir, residual_recipe, x)
    assert sim.arithmetic == "onnxruntime-integer"
    # the plan's tail fusion points (last block output, pool) make the second Add and the pool integer kernels
    assert sim._engine_arith.summary() == {"requantized_layers": 5, "float_output_gemms": 1, "qlinear_adds": 2,
                                           "global_pools": 0, "qlinear_global_pools": 1}
    np.testing.assert_array_equal(emu, eng)
    assert np.abs(flt - eng).max() < 1.0  # the float QuantSim is the same model up to rounding flips


def test_verify_reports_the_integer_reference(tmp_path, tiny_recipe, tiny_images):
    from qexport.verify.compare import VerifyConfig, verify

    engine_dir = _engine_for(tmp_path, tiny_recipe)
    rep, out = verify(VerifyConfig(engine=engine_dir, recipe=tiny_recipe, data=tiny_images, report=tmp_path / "rep",
                                   bench_batch_sizes=(), quiet=True))
    acc = rep["accuracy"]
    assert rep["quantsim_arithmetic"] == "onnxruntime-integer"
    assert acc["engine_vs_quantsim_agreement"] == 1.0 and acc["logit_abs_diff_max"] == 0.0
    assert {"quantsim_float_top1", "engine_vs_quantsim_float_agreement"} <= set(acc)
    assert "onnxruntime-integer" in (out / "report.md").read_text()


def test_resnet20_w8a8_bit_exact(r20_engine, r20_w8a8, cifar_eval):
    x = cifar_eval[0][:64]
    eng, emu, _, _ = _compare(r20_engine, r20_w8a8, x)
    np.testing.assert_array_equal(emu, eng)


# ---------------------------------------------------------------- off by default, onnxruntime plans only
def test_off_by_default_and_onnxruntime_plans_only(tiny_recipe):
    recipe = QuantRecipe.load(tiny_recipe)
    sim = recipe.build_quantsim()
    assert sim.arithmetic == "float32" and sim._engine_arith is None
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = sim(x)
        b = sim.set_engine_arithmetic("onnxruntime").set_engine_arithmetic(None)(x)
    assert torch.equal(a, b) and sim.arithmetic == "float32"
    with pytest.raises(QexportError, match="only 'onnxruntime'"):
        sim.set_engine_arithmetic("tensorrt")
    trt_plan = dataclasses.replace(recipe.plan, target="tensorrt")
    other = type(sim)(recipe.build_float_model(), trt_plan)
    with pytest.raises(QexportError, match="onnxruntime plan"):
        other.set_engine_arithmetic("onnxruntime")
