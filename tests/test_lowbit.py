"""Low-bit activations at integer speed (issue 12): codes clipped between Q and DQ, 8-bit fusion points.

- the onnxruntime plan has 8-bit fusion points at every activation width (conv outputs feeding residual Adds,
  the last block's output) and a pool point with the classifier input's grid; TensorRT's plan has none;
- the code clip: the exporter's ``Q -> Clip(codes) -> DQ`` equals ``Clip(x) -> Q -> DQ`` op by op; the
  ``code-clip`` rule accepts it and refuses bounds that are no grid, and TensorRT's ``qdq-pair`` refuses it;
- ResNet-20 W4A4 (shared folder): every Conv is a QLinearConv after ONNX Runtime's optimizer, nothing runs in
  float, and QuantSim in ONNX Runtime's integer arithmetic gives the engine's logits bit for bit.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from qexport.export.check import check_model
from qexport.export.check_rules_lowbit import grid_bits
from qexport.quant.spec import BitsConfig
from test_check import _node, _set_init, build_good


@pytest.fixture(scope="module")
def r20_folded():
    from qexport.models import fold_batchnorm, load_model

    return fold_batchnorm(load_model("cifar:resnet20").model)


def test_plan_fusion_points_at_every_width(r20_folded):
    from qexport.quant.plan import build_plan

    for bits in ("w8a8", "w4a4", "w3a3"):
        plan = build_plan(r20_folded, "onnxruntime", BitsConfig.parse(bits))
        acts = {ap.name: ap for ap in plan.activations}
        fusion = [ap for ap in plan.activations if ap.role == "fusion"]
        conv_outs = [ap for ap in fusion if ap.name.endswith("conv2") or ap.name.endswith("conv1")]
        assert len(conv_outs) == 9 and all(ap.spec.bits == 8 and ap.spec.signed for ap in conv_outs)
        assert acts["relu_18"].role == "fusion" and acts["relu_18"].spec.bits == 8  # the last block's output
        pool, fc_in = acts["adaptive_avg_pool2d"], acts["flatten"]
        assert pool.role == "fusion" and pool.spec == fc_in.spec and fc_in.share_scale_with == pool.name
        assert fc_in.spec.bits == BitsConfig.parse(bits).act_bits
    trt = build_plan(r20_folded, "tensorrt", BitsConfig.parse("w4a4"))
    assert not any(ap.role == "fusion" for ap in trt.activations)


def code_clip_model(lo: int = 0, hi: int = 15) -> onnx.ModelProto:
    """The checker's good graph with its 4-bit float Clip moved onto the codes (onnxruntime encoding)."""
    m = build_good("onnxruntime")
    nodes = [n for n in m.graph.node if n.name != "clip1"]
    _node(m, "q_a").input[0] = "r1"
    q_at = next(i for i, n in enumerate(nodes) if n.name == "q_a")
    nodes.insert(q_at + 1, helper.make_node("Clip", ["a_q", "cmin_u8", "cmax_u8"], ["a_qc"], name="code_clip"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    _node(m, "dq_a").input[0] = "a_qc"
    _set_init(m, "cmin_u8", np.uint8(lo))
    _set_init(m, "cmax_u8", np.uint8(hi))
    return m


def _run(m, x, optimize=False):
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_code_clip_equals_float_clip_and_passes_onnxruntime_rules():
    x = np.random.default_rng(3).normal(scale=2.0, size=(16, 3, 8, 8)).astype(np.float32)
    float_clip, code_clip = build_good("onnxruntime"), code_clip_model()
    float_clip.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    code_clip.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "n"
    np.testing.assert_array_equal(_run(code_clip, x), _run(float_clip, x))  # the same function, op by op
    assert check_model(code_clip, "onnxruntime") == []
    assert check_model(code_clip, "openvino") == []
    vs = check_model(code_clip, "tensorrt")  # TensorRT: a Q feeds only a DQ
    assert any(v.rule == "qdq-pair" and v.node == "q_a" and "Clip" in v.message for v in vs)


@pytest.mark.parametrize("lo,hi,what", [(0, 14, "not a low-bit grid"), (1, 16, "not a low-bit grid"),
                                        (0, 255, "not a low-bit grid")])
def test_code_clip_rule_wants_the_grid(lo, hi, what):
    vs = check_model(code_clip_model(lo, hi), "onnxruntime")
    assert [v.rule for v in vs] == ["code-clip"] and vs[0].node == "code_clip" and what in vs[0].message


def test_code_clip_rule_bound_type_and_consumer():
    m = code_clip_model()
    _set_init(m, "cmin_u8", np.float32(0.0))
    vs = check_model(m, "onnxruntime")
    assert "code-clip" in {v.rule for v in vs}
    m = code_clip_model()
    m.graph.node.append(helper.make_node("Cast", ["a_qc"], ["a_qc_f"], name="cast", to=TensorProto.FLOAT))
    vs = [v for v in check_model(m, "onnxruntime") if v.rule == "code-clip"]
    assert vs and "Cast" in vs[0].message


def test_grid_bits():
    assert grid_bits(0, 15, 0) == 4 and grid_bits(120, 135, 128) == 4 and grid_bits(121, 135, 128) == 4
    assert grid_bits(124, 131, 128) == 3 and grid_bits(0, 255, 0) is None and grid_bits(0, 14, 0) is None


# ---------------------------------------------------------------- ResNet-20 W4A4 (shared folder)
@pytest.fixture(scope="module")
def r20_w4a4_engine(tmp_path_factory, r20_w4a4):
    from qexport.build_engine import build_engine_folder
    from qexport.export.qdq import export_recipe

    d = tmp_path_factory.mktemp("r20_w4a4_lowbit")
    qdq, _, _ = export_recipe(r20_w4a4, "onnxruntime", d / "model.onnx")
    return qdq, build_engine_folder(qdq, d / "engine", "onnxruntime", threads=2)


def test_resnet20_w4a4_every_conv_fused(r20_w4a4_engine):
    qdq, _ = r20_w4a4_engine
    m = onnx.load(str(qdq))
    ops = collections.Counter(n.op_type for n in m.graph.node)
    clips = [n for n in m.graph.node if n.op_type == "Clip"]
    assert clips and all(n.input[0].endswith(".q") for n in clips)  # every low-bit clip is on codes
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(qdq.with_name("opt.onnx"))
    ort.InferenceSession(str(qdq), so, providers=["CPUExecutionProvider"])
    opt = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    assert opt["QLinearConv"] == ops["Conv"] == 19 and opt["Conv"] == 0
    assert opt["QLinearAdd"] == 9 and opt["QLinearGlobalAveragePool"] == 1 and opt["QGemm"] == 1
    assert opt["Add"] == opt["GlobalAveragePool"] == opt["Relu"] == 0


def test_resnet20_w4a4_integer_quantsim_bit_exact(r20_w4a4_engine, r20_w4a4, cifar_eval):
    from qexport.quant.engine_arith import emulated_here
    from qexport.recipe import QuantRecipe
    from qexport.runtimes import load_engine

    if not emulated_here():
        pytest.skip("ONNX Runtime's x86-64 kernels are the ones emulated")
    x = cifar_eval[0][:128]
    eng = load_engine(r20_w4a4_engine[1], "int8", 2).infer(x.numpy().astype(np.float32))
    sim = QuantRecipe.load(r20_w4a4).build_quantsim().set_exact_accumulation(True).set_engine_arithmetic()
    assert sim._engine_arith.summary() == {"requantized_layers": 19, "float_output_gemms": 1, "qlinear_adds": 9,
                                           "global_pools": 0, "qlinear_global_pools": 1}
    with torch.no_grad():
        np.testing.assert_array_equal(sim(x).numpy(), eng)
