"""OpenVINO target: parity with QuantSim, the per-layer divergence report, build/verify through the CLI.

Needs OpenVINO (skipped without it); the ResNet-20 tests need the shared folder (skipped without it). The
recipe here is a quick minmax W8A8 one for target openvino (128 calibration images), not the acceptance recipe:
the acceptance figures (5,000 images, mse) are in docs/openvino.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

PARITY_N = 256


# ---------------------------------------------------------------- OpenVINO + shared ResNet-20
@pytest.fixture(scope="module")
def ov():
    return pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'qexport[openvino]')")


@pytest.fixture(scope="module")
def r20_ov(tmp_path_factory, ov, r20_weights, cifar_train):
    """A quick minmax W8A8 ResNet-20 recipe for target openvino and its QDQ export."""
    from qexport.export.qdq import export_recipe
    from qexport.calibrate import CalibrateConfig, calibrate

    d = tmp_path_factory.mktemp("r20_ov")
    recipe = calibrate(CalibrateConfig(model="cifar:resnet20", output=d / "recipe", method="minmax", bits="w8a8",
                                       target="openvino", weights=str(r20_weights), data=str(cifar_train),
                                       num_samples=128, quiet=True))
    qdq, _, _ = export_recipe(recipe, "openvino", d / "model.onnx")
    return recipe, qdq


def _dataset(recipe_dir, folder):
    from qexport.data import ImageFolder
    from qexport.models import Preprocess
    from qexport.recipe import QuantRecipe

    recipe = QuantRecipe.load(recipe_dir)
    return recipe, ImageFolder(folder, Preprocess.from_dict(recipe.model.preprocess))


def test_build_verify_openvino_cli_parity(tmp_path, r20_ov, cifar_test, qx):
    recipe, qdq = r20_ov
    eng = tmp_path / "engine"
    res = qx("build-engine", qdq, "--target", "openvino", "-o", eng)
    assert res.code == 0, res.err
    meta = json.loads((eng / "engine.json").read_text())
    assert meta["target"] == "openvino"
    assert meta["model_properties"]["int8"]["INFERENCE_PRECISION_HINT"] == "f32"
    # every executed node of the INT8 model runs in u8/i8/f32, none in bf16 (the parity fix)
    precisions = {p for kinds in meta["runtime_precisions"]["int8"].values() for p in kinds}
    assert "bf16" not in precisions and "u8" in precisions, precisions
    rep = tmp_path / "report"
    res = qx("verify", eng, "--recipe", recipe, "--data", cifar_test, "--num-samples", PARITY_N, "--bench-batch", 0,
             "--min-agreement", 99.0, "--report", rep, "-q")
    assert res.code == 0, res.out + res.err
    report = json.loads((rep / "report.json").read_text())
    assert report["engine"]["target"] == "openvino"
    assert report["data"]["count"] == PARITY_N
    assert report["accuracy"]["engine_vs_quantsim_agreement"] >= 0.99
    assert "divergence" not in report  # only written when a check fails


def test_engine_reloads_from_cache(tmp_path, r20_ov):
    from qexport.build_engine import build_engine_folder
    from qexport.runtimes import load_engine

    _, qdq = r20_ov
    eng = build_engine_folder(qdq, tmp_path / "engine", "openvino", threads=2)
    runner = load_engine(eng, "int8")
    assert runner.loaded_from_cache
    x = runner.example_input(3)
    assert runner.infer(x).shape == (3, 10)


def _plant_fault(qdq, out, point: str, factor: float = 1.5):
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(qdq))
    for t in m.graph.initializer:
        if t.name == f"{point}.act_scale":
            t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * np.float32(factor)).astype(np.float32),
                                               t.name))
            break
    else:
        raise AssertionError(f"no scale for {point}")
    onnx.save(m, str(out))
    return out


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_divergence_names_planted_fault(tmp_path, r20_ov, cifar_test, runtime):
    from qexport.data import subset_indices
    from qexport.quant.u8s8_saturation import pairs_saturate
    from qexport.runtimes import get_runtime
    from qexport.verify.divergence import first_divergent_layer

    recipe_dir, qdq = r20_ov
    recipe, ds = _dataset(recipe_dir, cifar_test)
    idx = subset_indices(len(ds), 16, 0)
    sim = recipe.build_quantsim().eval().set_exact_accumulation(True)
    if pairs_saturate(runtime):  # a CPU without VNNI: the kernels saturate int16 pair sums of 8-bit weights
        sim.set_pair_saturation(runtime)
    # a layer input in the middle of the network (not the first point: the ones before it must agree)
    inputs = [lp for lp in recipe.plan.layers if lp.input_point]
    target = inputs[len(inputs) // 2]
    bad = _plant_fault(qdq, tmp_path / "bad.onnx", target.input_point)
    rt = get_runtime(runtime)
    eng = rt.build_engine(bad, tmp_path / "bad_engine", threads=2)
    rep = first_divergent_layer(eng, recipe, sim, ds, idx)
    assert rep["point"] == target.input_point, rep["summary"]
    assert rep["layer"] == target.name, rep["summary"]
    assert target.input_point in rep["summary"] and target.name in rep["summary"]
    # the healthy engine: nothing departs
    good = rt.build_engine(qdq, tmp_path / "good_engine", threads=2)
    rep = first_divergent_layer(good, recipe, sim, ds, idx)
    assert rep["point"] is None, rep["summary"]
    assert rep["summary"].startswith("no layer departs")
    rows = [r for r in rep["points"] if r.get("exposed")]
    assert len(rows) >= len(recipe.plan.activations) - 8  # ORT removes shared-scale requantizations: read_from
    assert all(r["frac_beyond_one_step"] <= 0.005 for r in rows)


def test_verify_failing_threshold_reports_divergence(tmp_path, r20_ov, cifar_test, qx):
    """A broken engine fails verify and the report names the planted layer."""
    from qexport.recipe import QuantRecipe

    recipe_dir, qdq = r20_ov
    recipe = QuantRecipe.load(recipe_dir)
    point = [lp for lp in recipe.plan.layers if lp.input_point][3].input_point
    bad = _plant_fault(qdq, tmp_path / "bad.onnx", point, factor=0.2)  # saturates: predictions change
    eng = tmp_path / "engine"
    assert qx("build-engine", bad, "--target", "openvino", "-o", eng).code == 0
    rep = tmp_path / "report"
    res = qx("verify", eng, "--recipe", recipe_dir, "--data", cifar_test, "--num-samples", 128, "--bench-batch", 0,
             "--min-agreement", 99.9, "--report", rep, "-q")
    assert res.code == 1
    report = json.loads((rep / "report.json").read_text())
    assert report["divergence"]["point"] == point, report["divergence"]["summary"]
    assert point in (rep / "report.md").read_text()
