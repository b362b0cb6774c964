"""Target descriptors (qexport/quant/targets.py): one place per target, and the target mismatches a user can make.

Runs on the tiny factory model (a residual Add fed by a conv, so the onnxruntime W8A8 plan has fusion points the
openvino plan lacks) and generated images; no shared folder needed.
"""

from __future__ import annotations

import json

import pytest

from conftest import TINY, assert_user_error
from qexport.errors import QexportError
from qexport.quant.spec import activation_spec
from qexport.quant.targets import PlanPolicy, Target, get_target, list_targets, register_target


def test_builtin_descriptors():
    assert list_targets()[:3] == ["onnxruntime", "tensorrt", "openvino"]
    ort, trt, ov = (get_target(n) for n in ("onnxruntime", "tensorrt", "openvino"))
    signed8, unsigned8, unsigned4 = activation_spec(8, False), activation_spec(8, True), activation_spec(4, True)
    assert ort.act_encoding(signed8) == ("uint8", 128, None)
    assert ort.act_encoding(unsigned8) == ("uint8", 0, None)
    assert ov.act_encoding(signed8) == ort.act_encoding(signed8)
    assert trt.act_encoding(signed8) == ("int8", 0, None)
    assert trt.act_encoding(unsigned4) == ("int8", 0, (0, 15))
    with pytest.raises(QexportError, match="recalibrate with --target tensorrt"):
        trt.act_encoding(unsigned8)
    assert ort.plan != ov.plan and ort.plan != trt.plan  # each needs its own plan at W8A8
    assert ort.integer_arithmetic == "onnxruntime" and ov.integer_arithmetic is None
    assert ov.runtimes == ("openvino",) and ort.runtimes == ("onnxruntime",)
    with pytest.raises(QexportError, match="unknown target 'tflite'"):
        get_target("tflite")
    with pytest.raises(QexportError, match="act_dtype"):
        Target("x", "", act_dtype="int4", bias="int32", plan=PlanPolicy(True, False), runtimes=("onnxruntime",))
    with pytest.raises(ValueError, match="already registered"):
        register_target(Target("onnxruntime", "", act_dtype="int8", bias="float", plan=PlanPolicy(False, False),
                               runtimes=("onnxruntime",)))


@pytest.fixture(scope="module")
def ort_w8a8(tmp_path_factory, tiny_images):
    from qexport.calibrate import CalibrateConfig, calibrate

    out = tmp_path_factory.mktemp("ort_w8a8") / "recipe"
    return calibrate(CalibrateConfig(model=TINY, output=out, method="minmax", bits="w8a8", data=str(tiny_images),
                                     num_samples=24, quiet=True))


def test_export_to_a_target_whose_plan_differs_is_refused(tmp_path, ort_w8a8, qx):
    from qexport.recipe import QuantRecipe

    assert any(ap.role == "fusion" for ap in QuantRecipe.load(ort_w8a8).plan.activations)
    for target, why in (("openvino", "onnxruntime plan"), ("tensorrt", "unsigned 8-bit activations")):
        out = tmp_path / f"{target}.onnx"
        assert_user_error(qx("export", ort_w8a8, "--target", target, "-o", out), why,
                          f"recalibrate with --target {target}")
        assert not out.exists()


def test_export_to_a_target_with_the_same_plan_is_exact(tmp_path, tiny_images, qx):
    """At W4A4 the openvino and tensorrt plans are the same (no fusion points; unsigned grids below 8 bits fit
    int8), so an openvino recipe exports to tensorrt (the plans compare equal); the onnxruntime plan adds fusion
    points at every width, so its W4A4 recipe is refused for openvino."""
    from qexport.export.qdq import check_plan_fits
    from qexport.quant.plan import build_plan
    from qexport.recipe import QuantRecipe

    recipe_dir = tmp_path / "r"
    assert qx("calibrate", TINY, "--method", "minmax", "--bits", "w4a4", "--data", tiny_images, "--num-samples", 12,
              "--target", "openvino", "-o", recipe_dir, "-q").code == 0
    recipe = QuantRecipe.load(recipe_dir)
    folded = recipe.build_float_model()
    own = build_plan(folded, "tensorrt", recipe.plan.bits)
    assert (own.layers, own.activations) == (recipe.plan.layers, recipe.plan.activations)
    check_plan_fits(recipe, "tensorrt", folded)
    res = qx("export", recipe_dir, "--target", "tensorrt", "-o", tmp_path / "tensorrt.onnx")
    assert res.code == 0, res.err
    ort_dir = tmp_path / "ort"
    assert qx("calibrate", TINY, "--method", "minmax", "--bits", "w4a4", "--data", tiny_images, "--num-samples", 12,
              "-o", ort_dir, "-q").code == 0
    assert_user_error(qx("export", ort_dir, "--target", "openvino", "-o", tmp_path / "ov.onnx"),
                      "onnxruntime plan", "recalibrate with --target openvino")


def test_build_engine_refuses_an_export_for_another_target(tmp_path, ort_w8a8, qx):
    qdq = tmp_path / "m.onnx"
    assert qx("export", ort_w8a8, "--target", "onnxruntime", "-o", qdq).code == 0
    assert_user_error(qx("build-engine", qdq, "--target", "openvino", "-o", tmp_path / "e"),
                      "exported for onnxruntime, not openvino", "--target openvino")
    assert not (tmp_path / "e").exists()


def test_run_uses_the_targets_plan(tmp_path, tiny_images, qx):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'qexport[openvino]')")
    out = tmp_path / "run"
    res = qx("run", TINY, "--method", "minmax", "--target", "openvino", "--data", tiny_images, "--eval-data",
             tiny_images, "--num-samples", 24, "-o", out, "-q")
    assert res.code == 0, res.err
    recipe = json.loads((out / "recipe" / "recipe.json").read_text())
    assert recipe["plan"]["target"] == "openvino"
    assert not [a for a in recipe["plan"]["activations"] if a["role"] == "fusion"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["engine"]["target"] == "openvino" and report["recipe"]["plan_target"] == "openvino"
    assert report["accuracy"]["engine_vs_quantsim_agreement"] == 1.0
