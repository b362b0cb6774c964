"""Aligned activation points (AlignQ's ``Q(a * erf(x / sqrt 2))``): plan, QuantSim, recipe, export, engines.

A tiny Conv-BN-ReLU net with two aligned points, calibrated in memory (seconds): the exported file equals
QuantSim op by op in both encodings (Erf and the code lookup), the recipe's integers are in the file bit for bit,
ONNX Runtime's fused engine equals QuantSim's integer emulation, OpenVINO runs it, and every runtime's Erf gives
QuantSim's codes on all 256 incoming codes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from qexport.errors import QexportError
from qexport.quant.aligned import (INV_SQRT2, align_plan, bn_layers, default_in_scale, lookup_table, make_aligned,
                                   saturation_input)
from qexport.quant.plan import QuantPlan, build_plan
from qexport.quant.spec import BitsConfig, QuantSpec
from qexport.recipe import QuantRecipe

BN_NET = "tests_support.models:tiny_bn_net"


def _aligned_recipe(tmp_path, target: str = "onnxruntime", bits: str = "w4a4"):
    from qexport.calibrators.base import calibrate_activations, set_weight_scales
    from qexport.models import fold_batchnorm, load_model
    from qexport.quant.quantsim import QuantSim
    from qexport.recipe import ModelRef

    loaded = load_model(BN_NET)
    folded = fold_batchnorm(loaded.model)
    plan, names = align_plan(build_plan(folded, target, BitsConfig.parse(bits)), folded, bn_layers(loaded.model))
    sim = QuantSim(folded, plan)
    x = torch.randn(128, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.5
    set_weight_scales(sim, "minmax")
    calibrate_activations(sim, x, "minmax", quiet=True)
    sim.snap_weights()
    ref = ModelRef(BN_NET, loaded.input_shape, loaded.preprocess.to_dict(), loaded.num_classes)
    out = tmp_path / f"recipe_{target}_{bits}"
    QuantRecipe.from_quantsim(sim.eval(), folded, ref, {"method": "test"}).save(out)
    return out, names


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    return _aligned_recipe(tmp_path_factory.mktemp("aligned"))


def _inputs(n: int = 96) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 1.5


def _sim_logits(recipe_dir, x):
    sim = QuantRecipe.load(recipe_dir).build_quantsim().set_exact_accumulation(True)
    with torch.no_grad():
        return sim(x).numpy()


def _ort(path, x, optimize: bool):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


# ---------------------------------------------------------------- plan
def test_plan_aligns_relu_after_bn_and_round_trips(aligned):
    recipe = QuantRecipe.load(aligned[0])
    kinds = {ap.name: ap.kind for ap in recipe.plan.activations}
    assert sorted(aligned[1]) == ["relu", "relu_1"] and kinds["relu"] == kinds["relu_1"] == "erf"
    assert kinds["x"] == "linear"  # the network input is not a BN output
    ap = recipe.plan.activation("relu")
    assert (ap.gain, ap.spec.qmax, ap.in_spec.qmax) == (2.0, 15, 255)
    assert recipe.act_scales["relu"] == pytest.approx(2.0 / 15, rel=1e-7)  # fixed, not calibrated
    assert QuantPlan.from_dict(recipe.plan.to_dict()) == recipe.plan


def test_alignment_without_bn_names_the_layer():
    from qexport.models import fold_batchnorm, load_model

    loaded = load_model("tests_support.models:tiny_net")  # conv2 -> ReLU has no BN
    folded = fold_batchnorm(loaded.model)
    plan = build_plan(folded, "onnxruntime", BitsConfig.parse("w4a4"))
    with pytest.raises(QexportError, match="conv2"):
        align_plan(plan, folded, bn_layers(loaded.model))


def test_target_without_erf_and_signed_points_are_refused():
    ap = build_plan.__globals__["ActPoint"]("relu", QuantSpec(4, signed=False), "input")
    with pytest.raises(QexportError, match="cannot run Erf"):
        make_aligned(ap, "tflite")
    with pytest.raises(QexportError, match="non-negative"):
        make_aligned(dataclasses.replace(ap, spec=QuantSpec(4, signed=True)), "onnxruntime")


# ---------------------------------------------------------------- the point's arithmetic
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_table_is_quantsim_and_covers_the_output_grid(bits):
    spec, in_spec = QuantSpec(bits, signed=False), QuantSpec(8, signed=False)
    s_in, n = default_in_scale(spec, in_spec), spec.qmax
    table = lookup_table(s_in, in_spec, 2.0, 2.0 / n, spec)
    assert table[0] == 0 and table[-1] == n and np.all(np.diff(table) >= 0)
    if bits <= 4:  # every outgoing code is reachable from some incoming code (not at 8 bits: 256 -> 256 levels)
        assert len(np.unique(table)) == n + 1
    # the reference formula in float64: round(n * erf(code * s_in / sqrt 2))
    codes = np.arange(256) * np.float64(np.float32(s_in))
    want = np.round(n * torch.erf(torch.tensor(codes / np.sqrt(2.0))).numpy())
    assert np.mean(table == want) > 0.98  # float32 vs float64 may differ at a rounding tie, not more
    assert saturation_input(n) < 255 * s_in  # saturation lies inside the incoming range


def _erf_graph(path, s_in: np.float32, s_out: np.float32, gain: float):
    """The exported Erf chain alone: uint8 codes in, uint8 codes out."""
    inits = [numpy_helper.from_array(np.array(v, dtype=t), n) for n, v, t in
             (("si", s_in, np.float32), ("z", 0, np.uint8), ("c", INV_SQRT2, np.float32), ("g", gain, np.float32),
              ("so", s_out, np.float32))]
    nodes = [helper.make_node("DequantizeLinear", ["codes", "si", "z"], ["x"]),
             helper.make_node("Mul", ["x", "c"], ["xs"]), helper.make_node("Erf", ["xs"], ["e"]),
             helper.make_node("Mul", ["e", "g"], ["y"]), helper.make_node("QuantizeLinear", ["y", "so", "z"], ["out"])]
    g = helper.make_graph(nodes, "erf", [helper.make_tensor_value_info("codes", onnx.TensorProto.UINT8, [256])],
                          [helper.make_tensor_value_info("out", onnx.TensorProto.UINT8, [256])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("bits", [3, 4])
def test_runtime_erf_gives_quantsim_codes_on_every_incoming_code(tmp_path, bits):
    spec, in_spec = QuantSpec(bits, signed=False), QuantSpec(8, signed=False)
    s_in, s_out = np.float32(default_in_scale(spec, in_spec)), np.float32(2.0 / spec.qmax)
    table = lookup_table(float(s_in), in_spec, 2.0, float(s_out), spec)
    _erf_graph(tmp_path / "erf.onnx", s_in, s_out, 2.0)
    codes = np.arange(256, dtype=np.uint8)
    sess = ort.InferenceSession(str(tmp_path / "erf.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"codes": codes})[0], table)
    ov = pytest.importorskip("openvino")
    compiled = ov.Core().compile_model(str(tmp_path / "erf.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_array_equal(np.asarray(compiled(codes)[0]), table)


# ---------------------------------------------------------------- export: the file equals QuantSim
@pytest.mark.parametrize("encoding", ["erf", "lookup"])
def test_exported_file_equals_quantsim_op_by_op(tmp_path, aligned, encoding):
    from qexport.export.check import check_model
    from qexport.export.qdq import export_recipe

    recipe_dir = aligned[0]
    path, _, _ = export_recipe(recipe_dir, "onnxruntime", tmp_path / "m.onnx", erf_encoding=encoding)
    model = onnx.load(str(path))
    assert check_model(model, "onnxruntime") == [] and check_model(model, "openvino") == []
    ops = [n.op_type for n in model.graph.node]
    assert ("Erf" in ops) == (encoding == "erf") and ("Gather" in ops) == (encoding == "lookup")
    recipe = QuantRecipe.load(recipe_dir)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, q in recipe.int_weights.items():  # integer truth lives in the recipe
        np.testing.assert_array_equal(inits[f"{name}.weight_int8"], q.numpy())
    sim = recipe.build_quantsim()
    for point in aligned[1]:
        aq = sim.act_quantizers()[point]
        assert inits[f"{point}.in_scale"] == np.float32(aq.in_scale)
        if encoding == "lookup":
            want = lookup_table(float(aq.in_scale), aq.in_spec, aq.gain, float(aq.scale), aq.spec)
            np.testing.assert_array_equal(inits[f"{point}.lookup"], want)
    x = _inputs()
    np.testing.assert_allclose(_ort(path, x, optimize=False), _sim_logits(recipe_dir, x), rtol=0, atol=1e-5)


def test_onnxruntime_engine_equals_integer_emulation_and_openvino_agrees(tmp_path, aligned):
    from qexport.build_engine import build_engine_folder
    from qexport.export.qdq import export_recipe
    from qexport.quant.engine_arith import emulated_here
    from qexport.runtimes import load_engine

    recipe_dir, x = aligned[0], _inputs()
    sim = QuantRecipe.load(recipe_dir).build_quantsim().set_exact_accumulation(True)
    with torch.no_grad():
        ref = sim(x).numpy()
    for target in ("onnxruntime", "openvino"):
        if target != "onnxruntime":  # a recipe exports to the target whose plan it was calibrated with
            recipe_dir = _aligned_recipe(tmp_path, target)[0]
            sim = QuantRecipe.load(recipe_dir).build_quantsim().set_exact_accumulation(True)
            with torch.no_grad():
                ref = sim(x).numpy()
        q, _, _ = export_recipe(recipe_dir, target, tmp_path / f"{target}.onnx")
        engine = build_engine_folder(q, tmp_path / f"engine_{target}", target, threads=1)
        out = load_engine(engine, "int8", 1).infer(x.numpy())
        assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.98, target
        if target == "onnxruntime" and emulated_here():
            with torch.no_grad():
                emu = sim.set_engine_arithmetic("onnxruntime")(x).numpy()
            assert sim._engine_arith.summary()["requantized_layers"] >= 2  # convs feeding aligned points stay fused
            np.testing.assert_array_equal(out, emu)
            sim.set_engine_arithmetic(None)
        _divergence_reads_aligned_codes(engine, recipe_dir, sim, x, target)


def _divergence_reads_aligned_codes(engine, recipe_dir, sim, x, target):
    """verify's per-layer divergence compares the outgoing codes of the aligned points, and finds them equal."""
    from qexport.verify.divergence import first_divergent_layer

    data = [(x[i], 0) for i in range(len(x))]
    res = first_divergent_layer(engine, QuantRecipe.load(recipe_dir), sim, data, range(32), threads=1)
    rows = {r["point"]: r for r in res["points"]}
    assert res["point"] is None, res["summary"]
    for point in ("relu", "relu_1"):
        assert rows[point]["exposed"] and rows[point]["frac_beyond_one_step"] == 0.0, (target, rows[point])


def test_tensorrt_plan_exports_erf_and_refuses_lookup(tmp_path):
    from qexport.export.check import check_model
    from qexport.export.qdq import build_qdq_model

    recipe_dir, _ = _aligned_recipe(tmp_path, "tensorrt")
    recipe = QuantRecipe.load(recipe_dir)
    assert recipe.plan.activation("relu").in_spec == QuantSpec(8, signed=True)  # int8 codes 0..127
    model = build_qdq_model(recipe, "tensorrt")
    assert check_model(model, "tensorrt") == []  # TensorRT's rule check: Erf between DQ and Q builds
    assert "Erf" in [n.op_type for n in model.graph.node]
    with pytest.raises(QexportError, match="erf-encoding erf"):
        build_qdq_model(recipe, "tensorrt", erf_encoding="lookup")


def test_tensorrt_rules_flag_a_code_lookup(aligned):
    from qexport.export.check import check_model
    from qexport.export.qdq import build_qdq_model

    model = build_qdq_model(QuantRecipe.load(aligned[0]), "onnxruntime", erf_encoding="lookup")
    vs = check_model(model, "tensorrt")
    assert {v.node for v in vs if v.rule == "trt-no-lookup"} == {"relu.in_Q", "relu_1.in_Q"}
    assert not [v for v in vs if v.rule == "qdq-pair" and ".in_Q" in v.node]  # a lookup is a valid Q consumer


def test_export_cli_encoding_option(tmp_path, aligned, qx):
    from conftest import assert_user_error, tree

    out = tmp_path / "out"
    out.mkdir()
    assert_user_error(qx("export", aligned[0], "-o", out / "m.onnx", "--erf-encoding", "table"), "erf-encoding")
    assert tree(out) == set()
    res = qx("export", aligned[0], "-o", out / "m.onnx", "--erf-encoding", "lookup")
    assert res.code == 0, res.err
    assert "Gather" in {n.op_type for n in onnx.load(str(out / "m.onnx")).graph.node}
