"""The exporter on edge recipes: the file computes what QuantSim computes where a grid saturates."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from qexport.export.qdq import build_qdq_model
from qexport.recipe import QuantRecipe


def test_bias_beyond_int32_grid_saturates_like_quantsim(tmp_path, tiny_recipe):
    """A bias past the int32 grid (tiny input scale) is clamped to [-2^31, 2^31 - 1], as QuantSim clamps it.

    A learned activation step at its floor (1e-8) puts ``bias / (x_scale * w_scale)`` near 1e10; the int32
    bound 2^31 - 1 must not round to 2^31 in float32 and wrap to -2^31 (a sign flip of every such bias).
    """
    from qexport.runtimes.onnxrt import session_for

    recipe = QuantRecipe.load(tiny_recipe)
    layer = next(lp for lp in recipe.plan.layers if lp.name == "conv2")
    recipe.act_scales[layer.input_point] = 1e-8
    bias = recipe.sim_state["gm.conv2.bias"]
    bias_scale = np.float32(1e-8) * recipe.weight_scales["conv2"].numpy()
    assert (bias.numpy() / bias_scale).max() > 2**31 and (bias.numpy() / bias_scale).min() < -(2**31)

    model = build_qdq_model(recipe, "onnxruntime")
    q = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "conv2.bias_int32"))
    np.testing.assert_array_equal(np.sign(q), np.sign(bias.numpy()))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    x = torch.randn((8, *recipe.model.input_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = recipe.build_quantsim()(x).numpy()
    got = session_for(path, threads=1, optimize=False).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, float(np.abs(want).max())))
