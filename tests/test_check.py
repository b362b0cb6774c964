"""The offline QDQ checker: a correct hand-built graph passes for every target, each rule fires on a broken copy."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qexport.errors import QexportError
from qexport.export.check import (
    Violation,
    assert_valid,
    check_model,
    list_rules,
    run_check,
)
from qexport.quant.targets import list_targets

TARGETS = list_targets()

RULE_IDS = {"opset", "onnx-checker", "no-integer-ops", "qdq-constant-params", "scale-positive", "scale-shape",
            "trt-zero-point", "ort-qdq-types", "weight-per-channel", "activation-per-tensor", "quantized-inputs",
            "residual-add", "clip-range", "qdq-pair", "bias-int32", "code-clip", "weight-grid",
            "trt-no-lookup"}
S_IN, S_A, S_F = 0.02, 0.05, 0.03


def _act(target: str, signed_input: bool):
    """(numpy zero-point dtype, zero point) of an activation for the target's encoding."""
    if target == "onnxruntime":
        return np.uint8, (128 if signed_input else 0)
    return np.int8, 0


def build_good(target: str) -> onnx.ModelProto:
    """Q/DQ input -> Conv(+int32 bias) -> ReLU -> Clip(4-bit) -> Q/DQ -> Conv -> Add(residual) -> ReLU -> GAP -> Gemm."""
    rng = np.random.default_rng(0)
    inits = []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    zin_t, zin = _act(target, True)
    za_t, za = _act(target, False)
    init("s_in", np.float32(S_IN)), init("zp_in", zin_t(zin))
    init("s_a", np.float32(S_A)), init("zp_a", za_t(za))
    init("s_f", np.float32(S_F)), init("zp_f", za_t(za))
    sw1 = rng.uniform(0.01, 0.02, 4).astype(np.float32)
    init("W1", rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)), init("sw1", sw1)
    init("zp_w1", np.zeros(4, np.int8))
    init("B1", rng.integers(-500, 500, 4).astype(np.int32)), init("sb1", (np.float32(S_IN) * sw1).astype(np.float32))
    init("W2", rng.integers(-7, 8, (4, 4, 3, 3)).astype(np.int8))
    init("sw2", rng.uniform(0.01, 0.02, 4).astype(np.float32)), init("zp_w2", np.zeros(4, np.int8))
    init("B2", rng.normal(size=4).astype(np.float32))
    init("W3", rng.integers(-127, 128, (10, 4)).astype(np.int8))
    init("sw3", rng.uniform(0.01, 0.02, 10).astype(np.float32)), init("zp_w3", np.zeros(10, np.int8))
    init("B3", rng.normal(size=10).astype(np.float32))
    init("cmin", np.float32(0.0)), init("cmax", np.float32(15 * S_A))
    N = helper.make_node
    nodes = [
        N("QuantizeLinear", ["x", "s_in", "zp_in"], ["x_q"], name="q_in"),
        N("DequantizeLinear", ["x_q", "s_in", "zp_in"], ["x_dq"], name="dq_in"),
        N("DequantizeLinear", ["W1", "sw1", "zp_w1"], ["w1"], name="w1_dq", axis=0),
        N("DequantizeLinear", ["B1", "sb1"], ["b1"], name="b1_dq", axis=0),
        N("Conv", ["x_dq", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        N("Relu", ["c1"], ["r1"], name="relu1"),
        N("Clip", ["r1", "cmin", "cmax"], ["r1c"], name="clip1"),
        N("QuantizeLinear", ["r1c", "s_a", "zp_a"], ["a_q"], name="q_a"),
        N("DequantizeLinear", ["a_q", "s_a", "zp_a"], ["a_dq"], name="dq_a"),
        N("DequantizeLinear", ["W2", "sw2", "zp_w2"], ["w2"], name="w2_dq", axis=0),
        N("Conv", ["a_dq", "w2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        N("Add", ["c2", "a_dq"], ["s"], name="add"),
        N("Relu", ["s"], ["r2"], name="relu2"),
        N("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        N("Flatten", ["g"], ["f"], name="flatten"),
        N("QuantizeLinear", ["f", "s_f", "zp_f"], ["f_q"], name="q_f"),
        N("DequantizeLinear", ["f_q", "s_f", "zp_f"], ["f_dq"], name="dq_f"),
        N("DequantizeLinear", ["W3", "sw3", "zp_w3"], ["w3"], name="w3_dq", axis=0),
        N("Gemm", ["f_dq", "w3", "B3"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "good", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def _set_init(m, name, arr):
    for i, t in enumerate(m.graph.initializer):
        if t.name == name:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.asarray(arr), name))
            return
    m.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))


def _init(m, name):
    return numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name))


def _set_attr(node, **kw):
    for k, v in kw.items():
        for a in list(node.attribute):
            if a.name == k:
                node.attribute.remove(a)
        node.attribute.append(helper.make_attribute(k, v))


def _fires(m, target, rule, node):
    """Exactly ``rule`` fires and one of its violations names ``node``."""
    vs = check_model(m, target)
    assert {v.rule for v in vs} == {rule}, [str(v) for v in vs]
    assert node in {v.node for v in vs}, [str(v) for v in vs]
    return vs


def _enc(target):  # openvino takes the tensorrt encoding (int8, zero point 0)
    return "onnxruntime" if target == "onnxruntime" else "tensorrt"


@pytest.mark.parametrize("target", TARGETS)
def test_good_graph_passes_and_runs(target):
    m = build_good(_enc(target))
    assert check_model(m, target) == []
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)})
    assert y.shape == (1, 10) and np.isfinite(y).all()


def test_registry_and_violation_str():
    assert {r.id for r in list_rules()} == RULE_IDS
    assert "trt-zero-point" not in {r.id for r in list_rules("onnxruntime")}
    assert "ort-qdq-types" not in {r.id for r in list_rules("tensorrt")}
    assert str(Violation("trt-zero-point", "q_in", "zero point is not 0")) == "node q_in: trt-zero-point: zero point is not 0"
    assert all(r.description for r in list_rules())


def test_errors(tmp_path):
    with pytest.raises(QexportError, match="unknown target"):
        check_model(build_good("tensorrt"), "tflite")
    with pytest.raises(QexportError, match="cannot read"):
        check_model(tmp_path / "nope.onnx", "tensorrt")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\x00 not a protobuf \x13\x37" * 5)
    with pytest.raises(QexportError, match="cannot read"):
        check_model(bad, "tensorrt")


def test_path_run_check_and_assert_valid(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(build_good("tensorrt"), p)
    lines = []
    assert run_check(p, "tensorrt", echo=lines.append) == 0 and lines[-1].startswith("ok:")
    assert_valid(p, "tensorrt")
    lines.clear()
    assert run_check(p, "onnxruntime", echo=lines.append) == 1
    assert "ort-qdq-types" in lines[0]
    with pytest.raises(QexportError, match="ort-qdq-types"):
        assert_valid(p, "onnxruntime")


# ---- one broken copy per rule ---------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_opset(target):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)], ir_version=8)
    _fires(m, target, "opset", "<model>")


@pytest.mark.parametrize("target", TARGETS)
def test_onnx_checker(target):
    m = build_good(_enc(target))
    m.graph.node.append(helper.make_node("Relu", ["missing"], ["dangling"], name="bad_relu"))
    vs = _fires(m, target, "onnx-checker", "<model>")
    assert "missing" in vs[0].message


@pytest.mark.parametrize("target", TARGETS)
def test_no_integer_ops(target):
    m = build_good(_enc(target))
    _set_init(m, "A8", np.ones((2, 2), np.int8)), _set_init(m, "B8", np.ones((2, 2), np.int8))
    m.graph.node.append(helper.make_node("MatMulInteger", ["A8", "B8"], ["mmi_out"], name="mmi"))
    _fires(m, target, "no-integer-ops", "mmi")


@pytest.mark.parametrize("target", TARGETS)
def test_qdq_constant_params(target):
    m = build_good(_enc(target))
    m.graph.node.insert(0, helper.make_node("Identity", ["s_f"], ["s_f_dyn"], name="dyn_scale"))
    _node(m, "q_f").input[1] = "s_f_dyn"
    _fires(m, target, "qdq-constant-params", "q_f")


@pytest.mark.parametrize("bad", [-1.0, 0.0, np.inf])
@pytest.mark.parametrize("target", TARGETS)
def test_scale_positive(target, bad):
    m = build_good(_enc(target))
    sw2 = _init(m, "sw2").copy()
    sw2[1] = bad
    _set_init(m, "sw2", sw2)
    _fires(m, target, "scale-positive", "w2_dq")


@pytest.mark.parametrize("target", TARGETS)
def test_scale_shape(target):
    m = build_good(_enc(target))
    _set_init(m, "sw2", _init(m, "sw2")[:3]), _set_init(m, "zp_w2", _init(m, "zp_w2")[:3])
    _fires(m, target, "scale-shape", "w2_dq")
    m = build_good(_enc(target))  # zero point shaped unlike the scale
    _set_init(m, "zp_w2", np.int8(0))
    _fires(m, target, "scale-shape", "w2_dq")
    m = build_good(_enc(target))  # axis out of range
    _set_attr(_node(m, "w2_dq"), axis=4)
    vs = check_model(m, target)
    assert ("scale-shape", "w2_dq") in {(v.rule, v.node) for v in vs}


def test_trt_zero_point():
    m = build_good("tensorrt")
    _set_init(m, "zp_in", np.int8(1))
    _fires(m, "tensorrt", "trt-zero-point", "q_in")
    # the onnxruntime encoding (uint8, zero point 128) is rejected by the tensorrt rules
    vs = _fires(build_good("onnxruntime"), "tensorrt", "trt-zero-point", "q_in")
    assert any("UINT8" in v.message for v in vs)
    m = build_good("tensorrt")  # no zero point: uint8 output
    del _node(m, "q_f").input[2]
    del _node(m, "dq_f").input[2]
    _fires(m, "tensorrt", "trt-zero-point", "q_f")


def test_ort_qdq_types():
    vs = _fires(build_good("tensorrt"), "onnxruntime", "ort-qdq-types", "q_in")  # int8 activations
    assert "w1_dq" not in {v.node for v in vs}  # int8 weights are right
    m = build_good("onnxruntime")
    zp = _init(m, "zp_w2").copy()
    zp[0] = 3
    _set_init(m, "zp_w2", zp)
    _fires(m, "onnxruntime", "ort-qdq-types", "w2_dq")


@pytest.mark.parametrize("target", TARGETS)
def test_weight_per_channel(target):
    m = build_good(_enc(target))
    _set_attr(_node(m, "w2_dq"), axis=1)  # W2 is 4x4x3x3: the scale length fits axis 1 too
    _fires(m, target, "weight-per-channel", "w2_dq")
    m = build_good(_enc(target))
    _set_init(m, "sw2", np.float32(0.01)), _set_init(m, "zp_w2", np.int8(0))
    _fires(m, target, "weight-per-channel", "w2_dq")


def _single_op(op, w_shape, axis, **attrs):
    """DQ(x) and DQ(w) into one op; returns the model."""
    c = w_shape[axis]
    inits = [numpy_helper.from_array(np.ones(w_shape, np.int8), "W"),
             numpy_helper.from_array(np.full(c, 0.01, np.float32), "sw"),
             numpy_helper.from_array(np.zeros(c, np.int8), "zw"),
             numpy_helper.from_array(np.float32(0.1), "sx"), numpy_helper.from_array(np.int8(0), "zx")]
    x_shape = {"ConvTranspose": [1, w_shape[0], 4, 4]}.get(op, [2, w_shape[0] if op == "MatMul" or not
                                                                 attrs.get("transB") else w_shape[1]])
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="qx"),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dqx"),
             helper.make_node("DequantizeLinear", ["W", "sw", "zw"], ["w"], name="dqw", axis=axis),
             helper.make_node(op, ["xd", "w"], ["y"], name="op", **attrs)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("op, w_shape, attrs, good_axis, bad_axis, target", [
    ("ConvTranspose", (4, 2, 3, 3), {}, 0, 1, "tensorrt"),
    ("ConvTranspose", (4, 2, 3, 3), {}, 1, 0, "onnxruntime"),
    ("Gemm", (3, 5), {"transB": 1}, 0, 1, "tensorrt"),
    ("Gemm", (5, 3), {}, 1, 0, "tensorrt"),
    ("MatMul", (5, 3), {}, 1, 0, "tensorrt"),
])
def test_weight_axis_per_op(op, w_shape, attrs, good_axis, bad_axis, target):
    def per_channel(m):
        return [v for v in check_model(m, target) if v.rule == "weight-per-channel"]

    assert per_channel(_single_op(op, w_shape, good_axis, **attrs)) == []
    vs = per_channel(_single_op(op, w_shape, bad_axis, **attrs))
    assert [v.node for v in vs] == ["dqw"]


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_activation_per_tensor(target):
    m = build_good(target)
    zt, z = _act(target, True)
    _set_init(m, "s_in", np.full(3, S_IN, np.float32)), _set_init(m, "zp_in", np.full(3, z, zt))
    _set_attr(_node(m, "q_in"), axis=1), _set_attr(_node(m, "dq_in"), axis=1)
    _fires(m, target, "activation-per-tensor", "q_in")


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_quantized_inputs(target):
    m = build_good(target)
    _node(m, "fc").input[0] = "f"
    _fires(m, target, "quantized-inputs", "fc")
    m.metadata_props.append(onnx.StringStringEntryProto(key="qexport.float_nodes", value="conv9, fc"))
    assert check_model(m, target) == []  # the user asked to keep fc float
    m = build_good(target)
    _node(m, "conv1").input[1] = "W1f"  # a float weight
    _set_init(m, "W1f", _init(m, "W1").astype(np.float32))
    vs = _fires(m, target, "quantized-inputs", "conv1")
    assert "weight W1f" in vs[0].message


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_residual_add(target):
    m = build_good(target)
    _node(m, "add").input[1] = "r1c"  # the residual input is float
    _fires(m, target, "residual-add", "add")


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_residual_add_conv_plus_conv_passes(target):
    m = build_good(target)
    _node(m, "add").input[1] = "c1"  # both inputs straight from quantized convs (ResNet downsample block)
    assert check_model(m, target) == []


def test_residual_add_trt_needs_conv_or_dq():
    m = build_good("tensorrt")
    m.graph.node.insert(11, helper.make_node("Relu", ["c2"], ["c2r"], name="relu_c2"))
    _node(m, "add").input[0] = "c2r"  # neither from a DQ nor straight from the quantized conv
    _fires(m, "tensorrt", "residual-add", "add")
    m = build_good("onnxruntime")
    m.graph.node.insert(11, helper.make_node("Relu", ["c2"], ["c2r"], name="relu_c2"))
    _node(m, "add").input[0] = "c2r"
    assert check_model(m, "onnxruntime") == []  # one DQ input is enough for onnxruntime


@pytest.mark.parametrize("target", TARGETS)
def test_clip_range(target):
    m = build_good(_enc(target))
    _set_init(m, "cmax", np.float32(300 * S_A))  # outside int8 and uint8 ranges
    _fires(m, target, "clip-range", "clip1")
    m = build_good(_enc(target))
    _set_init(m, "cmax", np.float32(6.0))  # ReLU6 before a Q: an activation, the Q saturates anyway
    assert check_model(m, target) == []
    m = build_good(_enc(target))
    m.graph.node.insert(0, helper.make_node("Identity", ["cmax"], ["cmax_dyn"], name="dyn_max"))
    _node(m, "clip1").input[2] = "cmax_dyn"
    _fires(m, target, "clip-range", "clip1")


@pytest.mark.parametrize("target", TARGETS)
def test_qdq_pair(target):
    m = build_good(_enc(target))
    _set_init(m, "s_a2", np.float32(2 * S_A))
    _node(m, "dq_a").input[1] = "s_a2"
    _fires(m, target, "qdq-pair", "q_a")
    m = build_good(_enc(target))
    m.graph.node.append(helper.make_node("Identity", ["a_q"], ["a_q_id"], name="peek"))
    vs = _fires(m, target, "qdq-pair", "q_a")
    assert "peek" in vs[0].message


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_bias_int32(target):
    m = build_good(target)
    _set_init(m, "sb1", _init(m, "sb1") * 2)
    _fires(m, target, "bias-int32", "conv1")


# ---- a real float export: no DQ anywhere ------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_float_torch_export_flags_every_conv(target):
    import torch
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    buf = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), buf, dynamo=False, opset_version=17)
    m = onnx.load_from_string(buf.getvalue())
    vs = check_model(m, target)
    assert {v.rule for v in vs} == {"quantized-inputs"}
    convs = {n.name for n in m.graph.node if n.op_type in ("Conv", "Gemm")}
    assert len(convs) == 3 and {v.node for v in vs} == convs
