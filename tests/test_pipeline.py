"""Export invariants and engine parity on the pretrained ResNet-20 (shared folder), plus the tiny-model pipeline.

- the int8 weight initializers of the exported ONNX are the recipe's integers, bit for bit;
- a symmetric recipe exported for onnxruntime and for tensorrt computes the same outputs op by op in ONNX Runtime;
- an onnxruntime-plan recipe (unsigned 8-bit activations) is refused for tensorrt;
- exported files pass ``qexport check`` for their target;
- engine vs QuantSim top-1 agreement: W8A8 >= 99.9 %, W4A4 >= 99.5 % on a seeded test-dev subset.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from conftest import EVAL_N
from qexport.errors import QexportError
from qexport.export.check import check_model
from qexport.export.qdq import export_recipe
from qexport.quant.u8s8_saturation import pairs_saturate
from qexport.recipe import QuantRecipe


def _session(path, optimize: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, x: torch.Tensor, batch: int = 250) -> np.ndarray:
    return np.concatenate([sess.run(None, {"input": x[i:i + batch].numpy()})[0] for i in range(0, len(x), batch)])


def _quantsim_logits(recipe_dir, x: torch.Tensor, batch: int = 250) -> np.ndarray:
    # Exact accumulation, as verify uses: the engine's int32 accumulator does not drift as float32 sums do.
    sim = QuantRecipe.load(recipe_dir).build_quantsim().set_exact_accumulation(True)
    if pairs_saturate("onnxruntime"):  # a CPU without VNNI: 8-bit weights saturate int16 pair sums in the engine
        sim.set_pair_saturation("onnxruntime")
    with torch.no_grad():
        return torch.cat([sim(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()


def _int8_initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name[: -len(".weight_int8")]: numpy_helper.to_array(t) for t in model.graph.initializer
            if t.name.endswith(".weight_int8")}


# ---------------------------------------------------------------- integer truth lives in the recipe
def test_int8_initializers_equal_recipe_integers(r20_w8a8, r20_w8a8_onnx):
    recipe = QuantRecipe.load(r20_w8a8)
    inits = _int8_initializers(r20_w8a8_onnx)
    assert set(inits) == set(recipe.int_weights) and len(inits) == 20
    for name, q in recipe.int_weights.items():
        assert inits[name].dtype == np.int8
        np.testing.assert_array_equal(inits[name], q.numpy())
        assert inits[name].min() >= -127  # narrow range at 8 bits


def test_int8_initializers_equal_recipe_integers_w4a4(tmp_path, r20_w4a4):
    qdq, _, _ = export_recipe(r20_w4a4, "onnxruntime", tmp_path / "m.onnx")
    recipe = QuantRecipe.load(r20_w4a4)
    inits = _int8_initializers(qdq)
    assert set(inits) == set(recipe.int_weights)
    for name, q in recipe.int_weights.items():
        np.testing.assert_array_equal(inits[name], q.numpy())
        assert -8 <= inits[name].min() and inits[name].max() <= 7


def test_exported_files_are_valid_and_dynamic_batch(r20_w8a8_onnx):
    from qexport.export.qdq import fp32_path_for

    for path in (r20_w8a8_onnx, fp32_path_for(r20_w8a8_onnx)):
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        assert model.opset_import[0].version >= 13
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    meta = {p.key: p.value for p in onnx.load(str(r20_w8a8_onnx)).metadata_props}
    assert meta["qexport.target"] == "onnxruntime" and meta["qexport.bits"] == "w8a8"


# ---------------------------------------------------------------- targets differ in encoding, not in math
def test_symmetric_recipe_same_outputs_for_both_targets(tmp_path, r20_trt, cifar_eval):
    """A tensorrt-plan recipe (signed activations) exported for onnxruntime (uint8, zero point 128) and for
    tensorrt (int8, zero point 0) gives the same outputs when both files run op by op in ONNX Runtime."""
    x = cifar_eval[0][:200]
    ort_file, _, _ = export_recipe(r20_trt, "onnxruntime", tmp_path / "ort.onnx")
    trt_file, _, _ = export_recipe(r20_trt, "tensorrt", tmp_path / "trt.onnx")
    zps = {}
    for name, path in (("onnxruntime", ort_file), ("tensorrt", trt_file)):
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        zps[name] = {k: v for k, v in inits.items() if k.endswith(".act_zero_point")}
    assert zps["onnxruntime"].keys() == zps["tensorrt"].keys() and zps["tensorrt"]
    assert all(v.dtype == np.uint8 and int(v) == 128 for v in zps["onnxruntime"].values())
    assert all(v.dtype == np.int8 and int(v) == 0 for v in zps["tensorrt"].values())
    a = _run(_session(ort_file, optimize=False), x)
    b = _run(_session(trt_file, optimize=False), x)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, float(np.abs(b).max())))
    assert check_model(onnx.load(str(trt_file)), "tensorrt") == []


def test_onnxruntime_plan_refused_for_tensorrt(tmp_path, r20_w8a8, qx):
    with pytest.raises(QexportError, match="unsigned 8-bit activations"):
        export_recipe(r20_w8a8, "tensorrt", tmp_path / "t.onnx")
    res = qx("export", r20_w8a8, "--target", "tensorrt", "-o", tmp_path / "t.onnx")
    from conftest import assert_user_error

    assert_user_error(res, "unsigned 8-bit", "--target tensorrt")
    assert list(tmp_path.iterdir()) == []


def test_exports_pass_check_for_their_target(r20_w8a8_onnx, qx):
    res = qx("check", r20_w8a8_onnx, "--target", "onnxruntime")
    assert res.code == 0 and "passes all" in res.out
    res = qx("check", r20_w8a8_onnx, "--target", "tensorrt")  # uint8 activations break TensorRT's rules
    assert res.code == 1 and "violation" in res.out


# ---------------------------------------------------------------- parity engine vs QuantSim
def _parity(recipe_dir, onnx_file, cifar_eval):
    x, y = cifar_eval
    sim = _quantsim_logits(recipe_dir, x)
    eng = _run(_session(onnx_file), x)
    agree = float((sim.argmax(1) == eng.argmax(1)).mean())
    return agree, float((eng.argmax(1) == y.numpy()).mean()), float((sim.argmax(1) == y.numpy()).mean())


def test_parity_w8a8(r20_w8a8, r20_w8a8_onnx, cifar_eval):
    agree, eng_top1, sim_top1 = _parity(r20_w8a8, r20_w8a8_onnx, cifar_eval)
    assert agree >= 0.999, f"engine vs QuantSim agreement {agree:.4f} on {EVAL_N} images"
    assert eng_top1 > 0.75 and abs(eng_top1 - sim_top1) <= 0.002


def test_parity_w4a4(tmp_path, r20_w4a4, cifar_eval):
    qdq, _, _ = export_recipe(r20_w4a4, "onnxruntime", tmp_path / "m.onnx")
    agree, eng_top1, _ = _parity(r20_w4a4, qdq, cifar_eval)
    assert agree >= 0.995, f"engine vs QuantSim agreement {agree:.4f} on {EVAL_N} images"
    assert eng_top1 > 0.4  # W4A4 with mse alone loses accuracy, but is far above chance


def test_verify_report_on_engine(tmp_path, r20_engine, r20_w8a8, cifar_test):
    """verify through the Python API: every figure the issue asks for is in report.json and report.md."""
    from qexport.verify.compare import VerifyConfig, verify

    rep, out = verify(VerifyConfig(engine=r20_engine, recipe=r20_w8a8, data=cifar_test, report=tmp_path / "rep",
                                   num_samples=200, bench_batch_sizes=(1,), bench_iters=5, quiet=True))
    acc = rep["accuracy"]
    for k in ("fp32_top1", "quantsim_top1", "engine_top1", "engine_vs_quantsim_agreement", "logit_abs_diff_mean",
              "logit_abs_diff_max", "top1_drop_points"):
        assert k in acc
    lat = rep["latency"][0]
    assert lat["batch_size"] == 1 and {"p50_ms", "p90_ms", "p99_ms"} <= set(lat["int8"]) and "speedup" in lat
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
    assert rep["passed"] and rep["data"]["count"] == 200


def test_exact_accumulation_is_float64_inside_and_close_to_float32(r20_w8a8, cifar_eval):
    sim = QuantRecipe.load(r20_w8a8).build_quantsim()
    x = cifar_eval[0][:16]
    seen = []
    conv = next(iter(sim.layers().values()))
    orig = conv._conv_forward
    conv._conv_forward = lambda inp, w, b: (seen.append(inp.dtype), orig(inp, w, b))[1]
    with torch.no_grad():
        a = sim(x)
        b = sim.set_exact_accumulation(True)(x)
    assert seen == [torch.float32, torch.float64] and b.dtype == torch.float32
    # Same model up to float rounding: most logits equal to a few ulps, none far off.
    assert float((a - b).abs().max()) < 1.0 and float((a.argmax(1) == b.argmax(1)).float().mean()) >= 0.9
