"""Quantization core: --bits grammar, quantizer grids, fake-quant, the placement plan per target, and the recipe
(round trip to an identical QuantSim, format/version validation)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from qexport.errors import QexportError
from qexport.quant.fake_quant import fake_quant, quantize_to_int, round_ste
from qexport.quant.spec import BitsConfig, QuantSpec, activation_spec, weight_spec
from qexport.recipe import RECIPE_VERSION, QuantRecipe


# ---------------------------------------------------------------- --bits
@pytest.mark.parametrize("text, w, a, label", [
    ("w8a8", 8, 8, "w8a8"), ("w4a8", 4, 8, "w4a8"), ("w4a4", 4, 4, "w4a4"), ("W2A2", 2, 2, "w2a2"),
    ("w4", 4, None, "w4a32"), ("w4a32", 4, None, "w4a32"), (" w8a8 ", 8, 8, "w8a8"), ("w1a8", 1, 8, "w1a8"),
])
def test_bits_parse_good(text, w, a, label):
    b = BitsConfig.parse(text)
    assert (b.weight_bits, b.act_bits, b.label) == (w, a, label)
    assert BitsConfig.from_dict(b.to_dict()) == b


@pytest.mark.parametrize("text, fragment", [
    ("8bit", "does not parse"), ("w8a", "does not parse"), ("a8w8", "does not parse"), ("", "does not parse"),
    ("w-4a8", "does not parse"), ("w9a8", "weight bits"), ("w0a8", "weight bits"), ("w8a1", "activation bits"),
    ("w8a9", "activation bits"), ("w8a16", "activation bits"),
])
def test_bits_parse_bad(text, fragment):
    with pytest.raises(QexportError, match=fragment):
        BitsConfig.parse(text)


def test_first_last_bits_range():
    assert BitsConfig.parse("w4a4", first_last_bits=8).first_last_bits == 8
    with pytest.raises(QexportError, match="first-last-bits"):
        BitsConfig.parse("w4a4", first_last_bits=9)


# ---------------------------------------------------------------- grids
@pytest.mark.parametrize("bits, lo, hi", [(8, -127, 127), (7, -64, 63), (4, -8, 7), (2, -2, 1)])
def test_weight_grid_narrow_only_at_8_bits(bits, lo, hi):
    s = weight_spec(bits)
    assert (s.qmin, s.qmax) == (lo, hi)
    assert s.signed and s.narrow == (bits == 8)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_grids(bits):
    u = activation_spec(bits, non_negative=True)
    s = activation_spec(bits, non_negative=False)
    assert (u.qmin, u.qmax) == (0, 2**bits - 1)
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)  # full range: no narrow for activations
    assert QuantSpec.from_dict(s.to_dict()) == s


def test_binary_and_out_of_range_specs():
    assert (QuantSpec(1).qmin, QuantSpec(1).qmax) == (-1, 1)
    for bad in (0, 9):
        with pytest.raises(QexportError):
            QuantSpec(bad)


# ---------------------------------------------------------------- fake quant
def test_fake_quant_rounds_half_to_even():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5])
    assert fake_quant(x, torch.tensor(1.0), -128, 127).tolist() == [-2.0, -2.0, -0.0, 0.0, 2.0, 2.0, 4.0]
    assert quantize_to_int(x * 0.1, torch.tensor(0.1), -8, 7).tolist() == [-2, -2, 0, 0, 2, 2, 4]
    # clamping to the grid
    assert fake_quant(torch.tensor([-100.0, 100.0]), torch.tensor(0.5), -8, 7).tolist() == [-4.0, 3.5]


def test_fake_quant_straight_through_gradient():
    x = torch.tensor([-10.0, -0.3, 0.2, 0.64, 10.0], requires_grad=True)
    fake_quant(x, torch.tensor(0.1), -8, 7).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # identity inside the range, zero where clamped
    y = torch.tensor([0.26, 1.7], requires_grad=True)
    round_ste(y).sum().backward()
    assert y.grad.tolist() == [1.0, 1.0]


def test_fake_quant_scale_gets_a_gradient():
    s = torch.tensor(0.1, requires_grad=True)
    fake_quant(torch.tensor([0.26, -0.33, 5.0]), s, -8, 7).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad)


# ---------------------------------------------------------------- the placement plan on ResNet-20
@pytest.fixture(scope="module")
def r20_folded():
    from qexport.models import fold_batchnorm, load_model

    return fold_batchnorm(load_model("cifar:resnet20").model)


def _plan(folded, target, bits="w8a8", **kw):
    from qexport.quant.plan import build_plan

    return build_plan(folded, target, BitsConfig.parse(bits, kw.pop("first_last_bits", None)), **kw)


def test_plan_weights_and_layers(r20_folded):
    plan = _plan(r20_folded, "onnxruntime")
    assert len(plan.layers) == 20  # 19 convs + the classifier
    assert plan.layers[0].name == "conv1" and plan.layers[-1].name == "linear"
    assert all(lp.weight == weight_spec(8) for lp in plan.layers)
    assert all(lp.input_point in {ap.name for ap in plan.activations} for lp in plan.layers)


def test_plan_onnxruntime_vs_tensorrt_signedness(r20_folded):
    ort_plan, trt_plan = _plan(r20_folded, "onnxruntime"), _plan(r20_folded, "tensorrt")
    ort_acts = {ap.name: ap for ap in ort_plan.activations}
    trt_acts = {ap.name: ap for ap in trt_plan.activations}
    # the network input can be negative: signed for both
    assert ort_acts["x"].spec.signed and trt_acts["x"].spec.signed
    # after ReLU: unsigned uint8 for ORT, signed int8 for TensorRT at 8 bits
    relus = [n for n in ort_acts if n.startswith("relu") and n in trt_acts]  # relu_18: ORT's tail fusion point
    assert relus and all(not ort_acts[n].spec.signed and ort_acts[n].spec.qmax == 255 for n in relus)
    assert all(trt_acts[n].spec.signed and (trt_acts[n].spec.qmin, trt_acts[n].spec.qmax) == (-128, 127)
               for n in relus)
    # ORT at 8 bits adds conv-output points before residual adds (QLinearAdd fusion); TensorRT does not
    assert any(ap.role == "fusion" for ap in ort_plan.activations)
    assert not any(ap.role == "fusion" for ap in trt_plan.activations)
    # below 8 bits an unsigned grid fits int8, so TensorRT keeps it unsigned
    trt4 = {ap.name: ap for ap in _plan(r20_folded, "tensorrt", "w4a4").activations}
    assert not trt4["relu"].spec.signed and trt4["relu"].spec.qmax == 15


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_plan_residual_and_pad_points_share_scale(r20_folded, target):
    plan = _plan(r20_folded, target)
    acts = {ap.name: ap for ap in plan.activations}
    residual = [ap for ap in plan.activations if ap.role == "residual"]
    assert len(residual) == 9  # one per BasicBlock: the shortcut input of its Add
    # option-A shortcuts (slice + zero pad) move the block input: their point reuses its scale and grid
    for name in ("pad", "pad_1"):
        ap = acts[name]
        assert ap.share_scale_with is not None and ap.share_scale_with.startswith("relu")
        assert acts[ap.share_scale_with].spec == ap.spec
    assert all(ap.share_scale_with for ap in residual)


def test_plan_first_last_bits_and_keep_float(r20_folded):
    plan = _plan(r20_folded, "onnxruntime", "w4a4", first_last_bits=8)
    assert plan.layers[0].weight.bits == 8 and plan.layers[-1].weight.bits == 8
    assert all(lp.weight.bits == 4 for lp in plan.layers[1:-1])
    acts = {ap.name: ap for ap in plan.activations}
    assert acts[plan.layers[0].input_point].spec.bits == 8 and acts[plan.layers[-1].input_point].spec.bits == 8
    kept = _plan(r20_folded, "onnxruntime", keep_float=("linear",))
    assert "linear" not in {lp.name for lp in kept.layers} and kept.float_layers == ("linear",)
    with pytest.raises(QexportError, match="names no layer"):
        _plan(r20_folded, "onnxruntime", keep_float=("nope",))
    with pytest.raises(QexportError, match="unknown target"):
        _plan(r20_folded, "tflite")


def test_plan_weights_only_has_no_activation_points(r20_folded):
    plan = _plan(r20_folded, "onnxruntime", "w4")
    assert plan.activations == () and all(lp.input_point is None for lp in plan.layers)


def test_plan_round_trips_through_json(r20_folded):
    from qexport.quant.plan import QuantPlan

    plan = _plan(r20_folded, "onnxruntime", "w4a8", first_last_bits=8)
    assert QuantPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    bad = plan.to_dict() | {"version": 99}
    with pytest.raises(QexportError, match="plan version 99"):
        QuantPlan.from_dict(bad)


# ---------------------------------------------------------------- recipe round trip and validation
def test_recipe_rebuilds_identical_quantsim(tmp_path, tiny_images):
    """Calibrate in memory, save, load: the rebuilt QuantSim gives bit-identical outputs and integers."""
    from qexport.calibrators import get_calibrator
    from qexport.calibrators.base import CalibrationContext, config_from_options
    from qexport.data import load_tensor
    from qexport.models import fold_batchnorm, load_model
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.recipe import ModelRef

    from conftest import TINY

    loaded = load_model(TINY)
    folded = fold_batchnorm(loaded.model)
    plan = build_plan(folded, "onnxruntime", BitsConfig.parse("w4a4"))
    x, y = load_tensor(tiny_images, loaded.preprocess)
    sim = QuantSim(folded, plan)
    info = get_calibrator("mse")
    ctx = CalibrationContext(sim=sim, folded=folded, model=loaded, data=x, labels=y, quiet=True,
                             artifact_dir=tmp_path, work_dir=tmp_path)
    info.fn(ctx, config_from_options(info.config, {}, "mse"))
    sim.eval()
    ref = ModelRef(TINY, loaded.input_shape, loaded.preprocess.to_dict(), loaded.num_classes)
    recipe = QuantRecipe.from_quantsim(sim, folded, ref, {"method": "mse"})
    recipe.save(tmp_path / "r")
    back = QuantRecipe.load(tmp_path / "r")
    sim2 = back.build_quantsim()
    with torch.no_grad():
        assert torch.equal(sim(x), sim2(x))
    for name, q in recipe.int_weights.items():
        assert torch.equal(back.int_weights[name], q) and q.dtype == torch.int8
        assert torch.equal(sim2.integer_weights()[name], q)
    assert back.act_scales == recipe.act_scales and back.plan == recipe.plan
    prov = json.loads((tmp_path / "r" / "recipe.json").read_text())["provenance"]
    assert prov["method"] == "mse" and "torch" in prov["versions"]


def test_recipe_provenance_from_the_pipeline(tiny_recipe):
    meta = json.loads((tiny_recipe / "recipe.json").read_text())
    assert meta["format"] == "qexport-recipe" and meta["version"] == RECIPE_VERSION
    prov = meta["provenance"]
    assert prov["method"] == "minmax" and prov["bits"] == "w8a8" and prov["seed"] == 0
    assert prov["num_samples"] == 24 and len(prov["data_fingerprint"]) == 64
    assert {"qexport", "torch", "onnx"} <= set(prov["versions"])


def _edit(src, dst, **changes):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "recipe.json").read_text())
    meta.update(changes)
    (dst / "recipe.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("change, fragment", [
    ({"version": RECIPE_VERSION + 1}, f"format version {RECIPE_VERSION + 1}"),
    ({"version": None}, "format version None"),
    ({"format": "something-else"}, "is not a qexport recipe"),
])
def test_recipe_version_and_format_validated(tmp_path, tiny_recipe, change, fragment):
    bad = _edit(tiny_recipe, tmp_path / "bad", **change)
    with pytest.raises(QexportError, match=fragment):
        QuantRecipe.load(bad)


def test_recipe_broken_files(tmp_path, tiny_recipe):
    with pytest.raises(QexportError, match="not found"):
        QuantRecipe.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QexportError, match="no recipe.json"):
        QuantRecipe.load(tmp_path / "empty")
    garbled = shutil.copytree(tiny_recipe, tmp_path / "garbled")
    (garbled / "recipe.json").write_text("{not json")
    with pytest.raises(QexportError, match="not readable JSON"):
        QuantRecipe.load(garbled)
    no_tensors = shutil.copytree(tiny_recipe, tmp_path / "no_tensors")
    (no_tensors / "tensors.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(QexportError, match="missing or corrupt"):
        QuantRecipe.load(no_tensors)
    meta = json.loads((tiny_recipe / "recipe.json").read_text())
    meta["act_scales"].pop(next(iter(meta["act_scales"])))
    lacking = _edit(tiny_recipe, tmp_path / "lacking", act_scales=meta["act_scales"])
    with pytest.raises(QexportError, match="lacks activation scales"):
        QuantRecipe.load(lacking)


@pytest.mark.parametrize("signed", [True, False])
def test_histogram_percentile_matches_exact_quantile(signed):
    from qexport.calibrators.base import HistogramObserver

    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(200_000, generator=gen) * 3 for _ in range(4)]
    folded = torch.cat(chunks).abs() if signed else torch.cat(chunks).clamp(min=0)
    hist = HistogramObserver(float(folded.max()), signed)
    for c in chunks:  # fed in batches, as calibration does
        hist(c)
    for pct in (99.0, 99.99, 99.999):
        exact = float(torch.quantile(folded.double(), pct / 100))
        assert abs(hist.percentile(pct) - exact) < float(folded.max()) / (1 << 13), pct
    assert hist.percentile(100.0) == pytest.approx(float(folded.max()), rel=1e-6)
