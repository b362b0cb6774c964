"""``--method alignq`` on the QAT trainer: a tiny Conv-BN-ReLU net, two epochs (seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_user_error, tree, write_png_folder
from qexport.recipe import QuantRecipe

BN_NET = "tests_support.models:tiny_bn_net"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    return write_png_folder(tmp_path_factory.mktemp("alignq_imgs"), classes=4, per_class=12)


def _calibrate(out: Path, data: Path, bits: str = "w4a4", model: str = BN_NET, **options) -> Path:
    from qexport.calibrate import CalibrateConfig, calibrate

    return calibrate(CalibrateConfig(model=model, output=out, method="alignq", bits=bits, data=str(data),
                                     quiet=True, options={"epochs": 2, "batch_size": 8, **options}))


@pytest.fixture(scope="module")
def alignq_recipe(tmp_path_factory, labelled) -> Path:
    return _calibrate(tmp_path_factory.mktemp("alignq") / "recipe", labelled)


def test_recipe_has_aligned_points_and_aligned_integer_weights(alignq_recipe):
    recipe = QuantRecipe.load(alignq_recipe)
    kinds = {ap.name: ap.kind for ap in recipe.plan.activations}
    assert kinds["relu"] == kinds["relu_1"] == "erf"
    for name, q in recipe.int_weights.items():
        lp = recipe.plan.layer(name)
        n = min(lp.weight.qmax, -lp.weight.qmin)
        assert int(q.abs().max()) <= n  # symmetric aligned grid [-n, n]
    sim = recipe.build_quantsim()
    assert all(float(sim.act_quantizers()[p].scale) == pytest.approx(2.0 / 15) for p in ("relu", "relu_1"))
    prov = recipe.provenance
    opts = prov["config"]["values"]
    assert prov["method"] == "alignq" and opts["mu"] == 0.2 and opts["rho"] == 0.3
    assert recipe.metrics["admm"] is True and recipe.metrics["aligned_points"] == 2
    assert recipe.metrics["trained_bn"] is True


def test_exported_alignq_engine_agrees_with_quantsim(tmp_path, alignq_recipe):
    from qexport.build_engine import build_engine_folder
    from qexport.export.qdq import export_recipe
    from qexport.runtimes import load_engine

    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sim = QuantRecipe.load(alignq_recipe).build_quantsim().set_exact_accumulation(True)
    with torch.no_grad():
        ref = sim(x).numpy()
    for target in ("onnxruntime",):  # an onnxruntime plan; OpenVINO needs a --target openvino recipe
        q, _, _ = export_recipe(alignq_recipe, target, tmp_path / f"{target}.onnx")
        out = load_engine(build_engine_folder(q, tmp_path / target, target, threads=1), "int8", 1).infer(x.numpy())
        assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.98, target


@pytest.mark.parametrize("options, fragment", [
    ({"gain": 0.0}, "--gain"), ({"mu": -1.0}, "--mu"), ({"rho": 0.0}, "--rho"), ({"align": "bias"}, "--align"),
    ({"cdf": False, "admm": False}, "--method ste"),
])
def test_bad_options_are_one_line_errors(tmp_path, labelled, options, fragment):
    from qexport.errors import QexportError

    with pytest.raises(QexportError, match=fragment) as e:
        _calibrate(tmp_path / "r", labelled, **options)
    assert "\n" not in str(e.value)
    assert tree(tmp_path) == set()


def test_model_without_bn_names_the_layer_and_writes_nothing(tmp_path, labelled, qx):
    res = qx("calibrate", "tests_support.models:tiny_net", "--method", "alignq", "--bits", "w4a4", "--data", labelled,
             "-o", tmp_path / "r", "-q")
    assert_user_error(res, "conv2", "BatchNorm")
    assert tree(tmp_path) == set()


@pytest.mark.parametrize("options, erf, aligned_w", [({"admm": False}, True, True), ({"cdf": False}, False, False),
                                                     ({"train_bn": False}, True, True)])
def test_ablations(tmp_path, labelled, options, erf, aligned_w):
    recipe = QuantRecipe.load(_calibrate(tmp_path / "r", labelled, epochs=1, **options))
    assert any(ap.kind == "erf" for ap in recipe.plan.activations) == erf
    assert recipe.metrics["aligned_weights"] == aligned_w and recipe.metrics["admm"] == options.get("admm", True)
    assert recipe.metrics["trained_bn"] == (aligned_w and options.get("train_bn", True))
