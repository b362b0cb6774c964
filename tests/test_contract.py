"""The contract every calibrator meets on every target, on a tiny model (seconds per case).

The cases are every registered calibrator (built-ins, the new methods as they land, and the toy plug-in of
tests_support found through its entry point) times every runtime target; a method gets this coverage by being
registered. A method runs with its ``contract_options`` (its tiny budget, given in ``register_calibrator`` or as
a config classmethod), passed through ``--options FILE.json`` like a user's. For each case:

- ``qexport calibrate`` succeeds (data-free methods get no ``--data``);
- the recipe round-trips: loaded and saved again, every tensor and every recipe.json field is unchanged;
- every integer lies on its grid: each layer's levels within its weight spec, and the exported file's int8
  initializers are exactly the recipe's integers;
- ``qexport check`` passes the exported file for the target;
- the exported file run op by op in ONNX Runtime (every Q/DQ node as written) equals QuantSim's logits within
  float32 rounding of a few ops, and for the onnxruntime target the fused ONNX Runtime engine equals QuantSim in
  ONNX Runtime's integer arithmetic (qexport/quant/engine_arith.py) bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file

from conftest import TINY, write_png_folder
from qexport.calibrators import list_calibrators
from qexport.quant.engine_arith import emulated_here
from qexport.recipe import QuantRecipe
from qexport.runtimes import list_runtimes

METHODS = list_calibrators()
TARGETS = list_runtimes()


def _calibrate(qx, tmp_path, info, target, images) -> Path:
    opts = tmp_path / "contract_options.json"
    opts.write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v
                                for k, v in info.contract_options.items()}))
    out = tmp_path / "recipe"
    data = ["--data", images, "--num-samples", 16] if info.needs_data else []
    res = qx("calibrate", TINY, "--method", info.name, "--bits", "w8a8", "--target", target, *data,
             "--options", opts, "--seed", 1, "--device", "cpu", "-o", out, "-q")
    assert res.code == 0, f"{info.name} on {target}: {res.err}"
    return out


def _assert_round_trip(recipe_dir, tmp_path) -> QuantRecipe:
    recipe = QuantRecipe.load(recipe_dir)
    again = recipe.save(tmp_path / "again")
    a, b = load_file(str(recipe_dir / "tensors.safetensors")), load_file(str(again / "tensors.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].equal(b[k]), k
    ja, jb = (json.loads((p / "recipe.json").read_text()) for p in (recipe_dir, again))
    assert ja == jb
    return recipe


def _assert_on_grid(recipe: QuantRecipe, onnx_file) -> None:
    layers = {lp.name: lp for lp in recipe.plan.layers}
    assert layers and set(layers) == set(recipe.int_weights)
    for name, q in recipe.int_weights.items():
        assert not q.is_floating_point(), name
        spec = layers[name].weight
        assert spec.qmin <= int(q.min()) and int(q.max()) <= spec.qmax, name
        s = recipe.weight_scales[name]
        assert s.shape == (q.shape[0],) and bool(torch.all(torch.isfinite(s) & (s > 0))), name
    assert all(np.isfinite(v) and v > 0 for v in recipe.act_scales.values())
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(onnx_file)).graph.initializer}
    int8 = {k: v for k, v in inits.items() if v.dtype == np.int8 and v.ndim >= 2}
    assert len(int8) == len(recipe.int_weights)
    exported = sorted(v.tobytes() for v in int8.values())
    assert exported == sorted(q.numpy().astype(np.int8).tobytes() for q in recipe.int_weights.values())


def _images(recipe: QuantRecipe, n: int = 16) -> torch.Tensor:
    shape = tuple(recipe.model.input_shape)
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def contract_images(tmp_path_factory):
    """16 labelled 16x16 PNGs in 4 classes: the tiny model's classes, for methods that train on labels."""
    return write_png_folder(tmp_path_factory.mktemp("contract_images"), classes=4, per_class=4)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("info", METHODS, ids=lambda i: i.name)
def test_contract(info, target, tmp_path, contract_images, qx):
    from qexport.runtimes.onnxrt import session_for

    recipe_dir = _calibrate(qx, tmp_path, info, target, contract_images)
    recipe = _assert_round_trip(recipe_dir, tmp_path)
    onnx_file = tmp_path / "model.onnx"
    res = qx("export", recipe_dir, "--target", target, "-o", onnx_file)
    assert res.code == 0, res.err
    _assert_on_grid(recipe, onnx_file)
    res = qx("check", onnx_file, "--target", target)
    assert res.code == 0 and "passes all" in res.out, res.out

    x = _images(recipe)
    sim = recipe.build_quantsim()
    with torch.no_grad():
        want = sim(x).numpy()
    got = session_for(onnx_file, threads=1, optimize=False).run(None, {"input": x.numpy()})[0]
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
    if target == "onnxruntime" and emulated_here():
        engine = session_for(onnx_file, threads=1, optimize=True).run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            emu = sim.set_exact_accumulation(True).set_engine_arithmetic("onnxruntime")(x).numpy()
        np.testing.assert_array_equal(engine, emu)


def test_every_method_is_covered():
    """The toy plug-in (entry point only) is among the cases, so a registered method is covered without an edit."""
    assert {"minmax", "percentile", "mse", "gpfq", "adasg", "toy"} <= {i.name for i in METHODS}
    assert {"onnxruntime", "openvino", "tensorrt"} <= set(TARGETS)
