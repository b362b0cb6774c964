"""Marker nodes -> Q/DQ nodes: the rewrite of a QuantSim traced in export mode into a target's QDQ graph.

qexport/export/qdq.py traces QuantSim with every quantizer as a ``qexport.*`` marker naming its plan point; the
editor replaces each marker with the target's encoding of the recipe's integers (activation Q/DQ pairs with the
low-bit clip where the target puts it, aligned points as Erf or a code lookup, int8 per-channel weight DQs, the
bias as an int32 DQ or float values on its grid) and drops what nothing reads any more.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qexport.errors import QexportError
from qexport.quant.markers import DOMAIN
from qexport.quant.quantsim import aq_module_name
from qexport.quant.spec import QuantSpec
from qexport.quant.targets import get_target
from qexport.recipe import QuantRecipe

_ONNX_DTYPES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8}


def act_encoding(spec: QuantSpec, target: str) -> tuple[int, int, tuple[int, int] | None]:
    """ONNX encoding of an activation grid for a target (its descriptor's encoding, as an ONNX element type).

    Args:
        spec: the activation grid (zero point 0 in the recipe).
        target: the export target.

    Returns:
        (ONNX element type, zero point, clip range in integer levels or None when the 8-bit type suffices).
    """
    dtype, zp, clip = get_target(target).act_encoding(spec)
    return _ONNX_DTYPES[dtype], zp, clip


class GraphEditor:
    """Rewrites marker nodes into Q/DQ nodes and integer initializers."""

    def __init__(self, model: onnx.ModelProto, recipe: QuantRecipe, target: str, erf_encoding: str = "erf"):
        self.model, self.recipe, self.target = model, recipe, get_target(target)
        self.erf_encoding = erf_encoding
        self.graph = model.graph
        self.new_inits: list[TensorProto] = []
        self.inits = {t.name: t for t in self.graph.initializer}
        self.layer_input = {lp.name: lp.input_point for lp in recipe.plan.layers}
        self.plan_acts = {ap.name: ap for ap in recipe.plan.activations}

    def _const(self, name: str, arr: np.ndarray) -> str:
        self.new_inits.append(numpy_helper.from_array(arr, name))
        return name

    def _act(self, node: onnx.NodeProto, point: str) -> list[onnx.NodeProto]:
        ap = self.plan_acts[point]
        scale = np.float32(self.recipe.act_scales[point])
        dtype, zp, clip = act_encoding(ap.spec, self.target.name)
        zp_arr = np.array(zp, dtype=np.uint8 if dtype == TensorProto.UINT8 else np.int8)
        s_name = self._const(f"{point}.act_scale", np.array(scale, dtype=np.float32))
        z_name = self._const(f"{point}.act_zero_point", zp_arr)
        src, out, nodes = node.input[0], node.output[0], []
        if clip is not None and self.target.code_clip:
            np_t = np.uint8 if dtype == TensorProto.UINT8 else np.int8
            lo = self._const(f"{point}.code_min", np.array(clip[0] + zp, dtype=np_t))
            hi = self._const(f"{point}.code_max", np.array(clip[1] + zp, dtype=np_t))
            nodes.append(helper.make_node("QuantizeLinear", [src, s_name, z_name], [f"{point}.q"], name=f"{point}.Q"))
            nodes.append(helper.make_node("Clip", [f"{point}.q", lo, hi], [f"{point}.q_clipped"],
                                          name=f"{point}.CodeClip"))
            nodes.append(helper.make_node("DequantizeLinear", [f"{point}.q_clipped", s_name, z_name], [out],
                                          name=f"{point}.DQ"))
            return nodes
        if clip is not None:
            lo_v, hi_v = np.float32(clip[0]) * scale, np.float32(clip[1]) * scale
            lo = self._const(f"{point}.clip_min", np.array(lo_v, dtype=np.float32))
            hi = self._const(f"{point}.clip_max", np.array(hi_v, dtype=np.float32))
            nodes.append(helper.make_node("Clip", [src, lo, hi], [f"{point}.clipped"], name=f"{point}.Clip"))
            src = f"{point}.clipped"
        nodes.append(helper.make_node("QuantizeLinear", [src, s_name, z_name], [f"{point}.q"], name=f"{point}.Q"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{point}.q", s_name, z_name], [out], name=f"{point}.DQ"))
        return nodes

    def _aligned(self, node: onnx.NodeProto, point: str) -> list[onnx.NodeProto]:
        """An aligned point: incoming Q, then ``Erf`` between DQ and the outgoing Q, or a table of codes."""
        from qexport.quant.aligned import INV_SQRT2, lookup_table

        ap = self.plan_acts[point]
        s_in = np.float32(self.recipe.sim_state[f"gm.{aq_module_name(point)}.in_scale"])
        s_out = np.float32(self.recipe.act_scales[point])
        (t_in, zp_in, _), (t_out, zp_out, _) = act_encoding(ap.in_spec, self.target.name), act_encoding(ap.spec, self.target.name)
        npt = lambda t: np.uint8 if t == TensorProto.UINT8 else np.int8  # noqa: E731
        si = self._const(f"{point}.in_scale", np.array(s_in, dtype=np.float32))
        zi = self._const(f"{point}.in_zero_point", np.array(zp_in, dtype=npt(t_in)))
        so = self._const(f"{point}.act_scale", np.array(s_out, dtype=np.float32))
        zo = self._const(f"{point}.act_zero_point", np.array(zp_out, dtype=npt(t_out)))
        p = point
        nodes = [helper.make_node("QuantizeLinear", [node.input[0], si, zi], [f"{p}.in_q"], name=f"{p}.in_Q")]
        if self.erf_encoding == "lookup":
            table = lookup_table(float(s_in), ap.in_spec, ap.gain, float(s_out), ap.spec) + zp_out
            tab = self._const(f"{p}.lookup", table.astype(npt(t_out)))
            offset = ap.in_spec.qmin - (-zp_in)  # index = code - in_qmin, the uint8 code itself when zp_in = 0
            if offset != 0 or t_in != TensorProto.UINT8:
                raise QexportError(f"aligned point {point}: the lookup encoding needs uint8 incoming codes; "
                                   f"export for {self.target.name} with --erf-encoding erf")
            nodes += [helper.make_node("Cast", [f"{p}.in_q"], [f"{p}.in_index"], name=f"{p}.Cast", to=TensorProto.INT32),
                      helper.make_node("Gather", [tab, f"{p}.in_index"], [f"{p}.q"], name=f"{p}.Lookup", axis=0)]
        else:
            c = self._const(f"{p}.inv_sqrt2", np.array(INV_SQRT2, dtype=np.float32))
            g = self._const(f"{p}.gain", np.array(np.float32(ap.gain), dtype=np.float32))
            nodes += [helper.make_node("DequantizeLinear", [f"{p}.in_q", si, zi], [f"{p}.in_dq"], name=f"{p}.in_DQ"),
                      helper.make_node("Mul", [f"{p}.in_dq", c], [f"{p}.scaled"], name=f"{p}.Mul"),
                      helper.make_node("Erf", [f"{p}.scaled"], [f"{p}.erf"], name=f"{p}.Erf"),
                      helper.make_node("Mul", [f"{p}.erf", g], [f"{p}.aligned"], name=f"{p}.Gain"),
                      helper.make_node("QuantizeLinear", [f"{p}.aligned", so, zo], [f"{p}.q"], name=f"{p}.Q")]
        nodes.append(helper.make_node("DequantizeLinear", [f"{p}.q", so, zo], [node.output[0]], name=f"{p}.DQ"))
        return nodes

    def _weight(self, node: onnx.NodeProto, layer: str) -> list[onnx.NodeProto]:
        q = self.recipe.int_weights[layer].numpy().astype(np.int8)
        s = self.recipe.weight_scales[layer].numpy().astype(np.float32)
        w = self._const(f"{layer}.weight_int8", q)
        sc = self._const(f"{layer}.weight_scale", s)
        zp = self._const(f"{layer}.weight_zero_point", np.zeros(s.shape, dtype=np.int8))
        return [helper.make_node("DequantizeLinear", [w, sc, zp], [node.output[0]], name=f"{layer}.weight_DQ", axis=0)]

    def _bias(self, node: onnx.NodeProto, layer: str) -> list[onnx.NodeProto]:
        # Read the bias from the recipe: the ONNX exporter may have merged identical initializers.
        b = self.recipe.sim_state[f"gm.{layer}.bias"].numpy().astype(np.float32)
        point = self.layer_input.get(layer)
        if point is None:  # weights-only: the input is float, so is the bias
            self._const(node.output[0], b)
            return []
        bias_scale = np.float32(self.recipe.act_scales[point]) * self.recipe.weight_scales[layer].numpy().astype(np.float32)
        # Saturate in float64: in float32 the bound 2**31 - 1 rounds up to 2**31, which wraps to -2**31 in int32.
        q = np.clip(np.round(b / bias_scale).astype(np.float64), -(2**31), 2**31 - 1).astype(np.int64)
        if self.target.bias == "float":  # e.g. TensorRT: float values on the int32 grid that QuantSim uses
            self._const(node.output[0], (q.astype(np.float32) * bias_scale).astype(np.float32))
            return []
        qn = self._const(f"{layer}.bias_int32", q.astype(np.int32))
        sn = self._const(f"{layer}.bias_scale", bias_scale.astype(np.float32))
        zn = self._const(f"{layer}.bias_zero_point", np.zeros(bias_scale.shape, dtype=np.int32))
        return [helper.make_node("DequantizeLinear", [qn, sn, zn], [node.output[0]], name=f"{layer}.bias_DQ", axis=0)]

    def rewrite(self) -> onnx.ModelProto:
        out_nodes = []
        for node in self.graph.node:
            if node.domain != DOMAIN:
                out_nodes.append(node)
                continue
            attr = {a.name: a.s.decode() for a in node.attribute}
            if node.op_type == "ActQDQ":
                out_nodes += self._act(node, attr["point"])
            elif node.op_type == "AlignedActQDQ":
                out_nodes += self._aligned(node, attr["point"])
            elif node.op_type == "WeightDQ":
                out_nodes += self._weight(node, attr["layer"])
            elif node.op_type == "BiasDQ":
                out_nodes += self._bias(node, attr["layer"])
            else:
                raise QexportError(f"internal: unknown marker {node.op_type}")
        del self.graph.node[:]
        self.graph.node.extend(_prune_dead_nodes(out_nodes, self.graph))
        used = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        kept = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept + [t for t in self.new_inits if t.name in used])
        for imp in list(self.model.opset_import):
            if imp.domain == DOMAIN:
                self.model.opset_import.remove(imp)
        return self.model


def _prune_dead_nodes(nodes: list, graph) -> list:
    """Drop nodes whose outputs nothing reads (e.g. Identity copies of merged float weights)."""
    outputs = {o.name for o in graph.output}
    nodes = list(nodes)
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        alive = [n for n in nodes if any(o in used for o in n.output)]
        if len(alive) == len(nodes):
            return alive
        nodes = alive
