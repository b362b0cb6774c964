"""Mixed precision: per-layer widths from a map reach the plan, every calibrator, the export and the engines;
an engine of a mixed plan computes what QuantSim computes, point by point; bad maps are one-line errors."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, assert_user_error, tree
from qexport.calibrate import CalibrateConfig, calibrate
from qexport.recipe import QuantRecipe

MIXED = ("conv2=w4a4", "fc=w3a6")


def _recipe(tmp_path, tiny_images, method="mse", bits="w8a8", layer_bits=MIXED, options=None, name="r",
            target="onnxruntime"):
    return calibrate(CalibrateConfig(model=TINY, output=tmp_path / name, method=method, bits=bits, target=target,
                                     layer_bits=layer_bits, data=str(tiny_images) if method != "adasg" else None,
                                     num_samples=24, quiet=True, device="cpu", options=options or {}))


def test_plan_holds_each_layers_widths(tmp_path, tiny_images):
    rec = QuantRecipe.load(_recipe(tmp_path, tiny_images))
    widths = {lp.name: lp.weight.bits for lp in rec.plan.layers}
    assert widths == {"conv1": 8, "conv2": 4, "conv3": 8, "fc": 3}
    acts = {ap.name: ap.spec.bits for ap in rec.plan.activations}
    inputs = {lp.name: acts[lp.input_point] for lp in rec.plan.layers}
    assert inputs == {"conv1": 8, "conv2": 4, "conv3": 8, "fc": 6}
    assert rec.plan.bits.label == "w8a8+mixed(2 layers)"
    # integers stay on each layer's own grid
    assert int(rec.int_weights["fc"].abs().max()) <= 4 and int(rec.int_weights["conv2"].abs().max()) <= 8
    assert int(rec.int_weights["conv1"].abs().max()) > 8


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_mixed_plan_engine_matches_quantsim_point_by_point(tmp_path, tiny_images, target):
    """Export + engine of a mixed plan: every activation point's codes equal QuantSim's (op by op)."""
    from qexport.data import ImageFolder
    from qexport.build_engine import build_engine_folder
    from qexport.export.qdq import export_recipe
    from qexport.models import Preprocess
    from qexport.quant.engine_arith import emulated_here
    from qexport.quant.u8s8_saturation import pairs_saturate
    from qexport.verify.divergence import first_divergent_layer

    r = _recipe(tmp_path, tiny_images, bits="w4a4", layer_bits=("conv2=w8a8", "conv3=w2a3"), target=target)
    rec = QuantRecipe.load(r)
    qdq, _, _ = export_recipe(r, target, tmp_path / "m.onnx")
    eng = build_engine_folder(qdq, tmp_path / "engine", target, threads=1)
    sim = rec.build_quantsim().set_exact_accumulation(True)
    if target == "onnxruntime" and emulated_here():  # its kernels' arithmetic (int16 pair saturation without VNNI)
        sim.set_engine_arithmetic("onnxruntime")
    if target == "openvino" and pairs_saturate("openvino"):  # conv2's 8-bit weights saturate pairs without VNNI
        sim.set_pair_saturation("openvino")
    ds = ImageFolder(tiny_images, Preprocess.from_dict(rec.model.preprocess))
    from qexport.export.check import run_check

    assert run_check(qdq, target, echo=lambda *a, **k: None) == 0  # the target's rules hold at every width
    rep = first_divergent_layer(eng, rec, sim, ds, list(range(len(ds))))
    rows = [r for r in rep["points"] if r.get("exposed")]
    assert len(rows) == len(rec.plan.activations)
    assert rep["point"] is None, rep["summary"]
    assert {r["bits"] for r in rows} == {3, 4, 8}
    assert max(r["frac_beyond_one_step"] for r in rows) < 0.001
    assert max(r["max_abs_steps"] for r in rows) <= 1


def test_verify_shows_each_layers_widths(tmp_path, tiny_images, qx):
    r = _recipe(tmp_path, tiny_images)
    assert qx("export", r, "-o", tmp_path / "m.onnx").code == 0
    assert qx("build-engine", tmp_path / "m.onnx", "-o", tmp_path / "eng", "--threads", "1").code == 0
    res = qx("verify", tmp_path / "eng", "--recipe", r, "--data", tiny_images, "--bench-batch", "0", "-q")
    assert res.code == 0, res.err
    assert "conv2 w4a4" in res.out and "fc w3a6" in res.out
    rep = json.loads((tmp_path / "eng.report" / "report.json").read_text())
    assert [(w["layer"], w["weight_bits"], w["input_bits"]) for w in rep["widths"]] == [
        ("conv1", 8, 8), ("conv2", 4, 4), ("conv3", 8, 8), ("fc", 3, 6)]
    assert rep["accuracy"]["engine_vs_quantsim_agreement"] == 1.0
    if rep["quantsim_arithmetic"] == "onnxruntime-integer":  # x86-64: the engine's integer arithmetic, emulated
        assert rep["accuracy"]["logit_abs_diff_max"] < 1e-4
    assert "| conv2 | conv2d | 4 | 4 |" in (tmp_path / "eng.report" / "report.md").read_text()


@pytest.mark.parametrize("method,options", [("minmax", {}), ("percentile", {}), ("gpfq", {"c": "1.0"}),
                                            ("brecq", {"iters": 20, "act_iters": 5, "batch_size": 8}),
                                            ("adasg", {"epochs": 2, "iters_per_epoch": 2, "warmup_epochs": 1,
                                                       "batch_size": 4, "act_init_samples": 16})])
def test_every_calibrator_takes_a_mixed_plan(tmp_path, tiny_images, method, options):
    rec = QuantRecipe.load(_recipe(tmp_path, tiny_images, method=method, options=options))
    assert {lp.name: lp.weight.bits for lp in rec.plan.layers}["fc"] == 3
    assert int(rec.int_weights["fc"].abs().max()) <= 4


def test_bits_map_file_and_layer_bits_on_top(tmp_path, tiny_images, qx):
    m = tmp_path / "bits.json"
    m.write_text(json.dumps({"default": "w4a8", "layers": {"conv1": "w8a8", "fc": "w8a8"}}))
    out = tmp_path / "r"
    res = qx("calibrate", TINY, "--bits", m, "--layer-bits", "fc=w6a8", "--method", "minmax", "--data", tiny_images,
             "--num-samples", "8", "-q", "-o", out)
    assert res.code == 0, res.err
    rec = QuantRecipe.load(out)
    assert {lp.name: lp.weight.bits for lp in rec.plan.layers} == {"conv1": 8, "conv2": 4, "conv3": 4, "fc": 6}
    assert rec.plan.bits.to_dict()["layer_bits"] == {"conv1": "w8a8", "fc": "w6a8"}


@pytest.mark.parametrize("args,fragments", [
    (["--layer-bits", "conv22=w4a4"], ["conv22", "close names: conv2"]),
    (["--layer-bits", "conv2=w16a8"], ["conv2", "16-bit weights", "1..8"]),
    (["--layer-bits", "conv2=w4a12"], ["12-bit activations"]),
    (["--layer-bits", "conv2=w4"], ["conv2", "mixes float and integer"]),
    (["--layer-bits", "conv2"], ["NAME=wNaM"]),
    (["--bits", "nope.json"], ["not found"]),
    (["--bits", "auto"], ["needs a budget"]),
])
def test_bad_per_layer_bits_one_line_nothing_written(tmp_path, tiny_images, qx, args, fragments):
    out = tmp_path / "r"
    res = qx("calibrate", TINY, "--method", "minmax", "--data", tiny_images, "--num-samples", "8", "-q", "-o", out,
             *args)
    assert_user_error(res, *fragments)
    assert tree(tmp_path) == set()
