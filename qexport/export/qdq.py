"""Recipe + target -> QDQ ONNX, and the FP32 ONNX of the same float model.

QuantSim is traced in export mode: each quantizer becomes a ``qexport.*`` marker node naming its plan point.
The markers are then replaced by the target's encoding of the recipe's integers (never re-quantized): weights
int8 per channel for every target; activations and bias as the target's descriptor says
(qexport/quant/targets.py: uint8 with zero point 128 or 0 and an int32 bias DQ for onnxruntime and openvino,
int8 with zero point 0 and a float bias on the int32 grid for tensorrt).

A recipe exports to a target only when its plan is the one that target places on the same model (same
parity); otherwise the export is refused with a one-line error that says to recalibrate.

Below 8 bits an activation is an 8-bit Q/DQ pair with the low-bit scale and a Clip to the low-bit range,
which reproduces the low-bit quantization exactly in an INT8 engine (architecture.md). Where the Clip goes is
per target (the descriptor's ``code_clip``, qexport/quant/targets.py): on the integer codes between Q and DQ,
``Q -> Clip(codes, qmin + zp, qmax + zp) -> DQ`` (onnxruntime and openvino: the Q -> DQ pattern around every
conv stays intact, so ONNX Runtime fuses QLinearConv with a cheap integer Clip after it, while a float Clip
before Q stops that fusion), or on the float values before Q, ``Clip(x, qmin * s, qmax * s) -> Q -> DQ`` (TensorRT accepts only a Q feeding a DQ). The two
are the same function: Q rounds ``clip(x/s)`` and clipping commutes with the monotone rounding.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qexport import __version__
from qexport.errors import QexportError
from qexport.quant.markers import DOMAIN
from qexport.fileio import atomic_file, check_output_free
from qexport.quant.quantsim import aq_module_name
from qexport.quant.spec import QuantSpec
from qexport.quant.targets import get_target
from qexport.recipe import QuantRecipe

DEFAULT_OPSET = 17
ERF_ENCODINGS = ("erf", "lookup")  # how aligned (AlignQ) activation points are written; see _GraphEditor._aligned
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def _trace_to_onnx(module: torch.nn.Module, input_shape: tuple[int, ...], opset: int,
                   markers: bool = True) -> onnx.ModelProto:
    """Trace ``module`` with the TorchScript ONNX exporter, dynamic batch."""
    buf = io.BytesIO()
    dummy = torch.zeros((1, *input_shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (dummy,), buf, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              custom_opsets={DOMAIN: 1} if markers else None, do_constant_folding=True)
        except Exception as e:  # the exporter raises many types; the user needs one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QexportError(f"the model could not be exported to ONNX: {first}") from None
    return onnx.load_from_string(buf.getvalue())


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


class _GraphEditor:
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


_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def float_node_names(model: onnx.ModelProto, weights_only: bool) -> list[str]:
    """Nodes a plan deliberately leaves float, by ONNX name, for the checker's ``qexport.float_nodes``.

    Weighted nodes whose data input is not dequantized, and the residual Adds they feed (every Add when the
    plan quantizes no activations).
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type in _WEIGHTED_OPS:
            src = producer.get(n.input[0])
            if src is None or src.op_type != "DequantizeLinear":
                out.append(n.name)
        elif n.op_type == "Add" and (weights_only or any(producer.get(i) is not None and producer[i].name in out
                                                          for i in n.input)):
            out.append(n.name)
    return out


def _finish(model: onnx.ModelProto, meta: dict[str, str]) -> onnx.ModelProto:
    """Attach metadata, infer shapes and validate."""
    model.producer_name, model.producer_version = "qexport", __version__
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # onnx raises several types
        raise QexportError(f"internal: the exported ONNX is invalid: {str(e).splitlines()[0]}") from None
    return model


def recipe_fingerprint(recipe_dir: str | Path) -> str:
    """sha256 of a recipe's files, recorded in exported models so verify can match engine and recipe."""
    h = hashlib.sha256()
    for name in ("recipe.json", "tensors.safetensors"):
        h.update((Path(recipe_dir) / name).read_bytes())
    return h.hexdigest()


def check_plan_fits(recipe: QuantRecipe, target: str, folded: torch.nn.Module | None = None) -> None:
    """Refuse to export a recipe whose plan has points or grids the target's engine does not compute as QuantSim.

    The target's plan policy (qexport/quant/targets.py) says what its engine takes: a plan with fusion points
    (the onnxruntime plan) goes only to targets that take them, one with unsigned 8-bit grids only to targets that
    hold them. Everything else exports exactly (the file computes what QuantSim computes): e.g. a tensorrt plan
    for onnxruntime, an openvino plan for onnxruntime or tensorrt at W4A4.

    Args:
        recipe: the recipe.
        target: the export target.
        folded: unused (kept for callers that pass the float model).
    """
    made_for, policy = recipe.plan.target, get_target(target).plan
    fusion = [ap.name for ap in recipe.plan.activations if ap.role == "fusion"]
    unsigned8 = [ap.name for ap in recipe.plan.activations if ap.spec.bits == 8 and not ap.spec.signed]
    why = None
    if unsigned8 and not policy.unsigned_8bit:
        why = f"unsigned 8-bit activations ({unsigned8[0]}, ...), which {target} cannot hold"
    elif fusion and not policy.fusion_points:
        why = f"fusion points ({fusion[0]}, ...), which the {target} engine does not compute as QuantSim does"
    if why:
        raise QexportError(f"this recipe was calibrated with the {made_for} plan, with {why}; "
                           f"recalibrate with --target {target}")


def build_qdq_model(recipe: QuantRecipe, target: str, opset: int = DEFAULT_OPSET, meta: dict | None = None,
                    erf_encoding: str = "erf") -> onnx.ModelProto:
    """The QDQ ONNX model of a recipe for a target (in memory).

    Args:
        recipe: the recipe.
        target: a registered target (``onnxruntime``, ``tensorrt``, ``openvino``).
        opset: ONNX opset (>= 13).
        meta: extra metadata_props.
        erf_encoding: aligned activation points as ``erf`` (DQ -> Mul -> Erf -> Mul -> Q) or ``lookup`` (the
            table from incoming to outgoing codes: Q -> Cast -> Gather -> DQ; onnxruntime/openvino only).

    Returns:
        The validated ONNX model.
    """
    get_target(target)
    if opset < 13:
        raise QexportError(f"--opset {opset} is too old: per-channel Q/DQ needs opset 13 or newer")
    if erf_encoding not in ERF_ENCODINGS:
        raise QexportError(f"--erf-encoding {erf_encoding!r} is not one of {', '.join(ERF_ENCODINGS)}")
    for ap in recipe.plan.activations:  # fail before tracing when the target cannot hold a grid
        act_encoding(ap.spec, target)
        if ap.kind == "erf":
            _check_aligned_target(ap, target, erf_encoding)
    folded = recipe.build_float_model()
    check_plan_fits(recipe, target, folded)
    sim = recipe.build_quantsim(folded)
    with sim.export_mode(), torch.no_grad():
        model = _trace_to_onnx(sim, recipe.model.input_shape, opset)
    model = _GraphEditor(model, recipe, target, erf_encoding).rewrite()
    info = {"qexport.kind": "qdq", "qexport.target": target, "qexport.bits": recipe.plan.bits.label,
            "qexport.model": recipe.model.spec, "qexport.method": recipe.provenance.get("method", "")}
    # Each weight initializer's grid below 8 bits ("binary" or "intN"), so `qexport check` can test its integers.
    low = [f"{lp.name}.weight_int8={'binary' if lp.weight.binary else f'int{lp.weight.bits}'}"
           for lp in recipe.plan.layers if lp.weight.bits < 8]
    if low:
        info["qexport.weight_grids"] = ",".join(low)
    if any(ap.kind == "erf" for ap in recipe.plan.activations):
        info["qexport.erf_encoding"] = erf_encoding
    if recipe.plan.float_layers:
        info["qexport.float_layers"] = ",".join(recipe.plan.float_layers)
    if recipe.plan.float_layers or recipe.plan.bits.act_bits is None:
        # Layers left float on purpose (kept float, or weights-only): tell the checker, by ONNX node name.
        info["qexport.float_nodes"] = ",".join(float_node_names(model, recipe.plan.bits.act_bits is None))
    info.update(meta or {})
    return _finish(model, info)


def _check_aligned_target(ap, target: str, erf_encoding: str) -> None:
    """Refuse targets whose runtime cannot run an aligned point (before anything is traced or written)."""
    from qexport.quant.targets import targets_with

    encodings = get_target(target).erf_encodings
    if not encodings:
        raise QexportError(f"the recipe has aligned (Erf) activations, which target {target!r} cannot run; "
                           f"export for one of {', '.join(targets_with('erf_encodings'))}")
    act_encoding(ap.in_spec, target)
    if erf_encoding not in encodings:
        raise QexportError(f"target {target} takes no --erf-encoding {erf_encoding} (an integer code lookup is a "
                           f"Gather on Q codes); export with --erf-encoding {encodings[0]}")


def build_fp32_model(recipe: QuantRecipe, opset: int = DEFAULT_OPSET, meta: dict | None = None) -> onnx.ModelProto:
    """The FP32 ONNX of the recipe's (BN-folded) float model: the accuracy and latency baseline.

    Args:
        recipe: the recipe.
        opset: ONNX opset.
        meta: extra metadata_props.

    Returns:
        The validated ONNX model.
    """
    with torch.no_grad():
        model = _trace_to_onnx(recipe.build_float_model(), recipe.model.input_shape, opset, markers=False)
    return _finish(model, {"qexport.kind": "fp32", "qexport.model": recipe.model.spec, **(meta or {})})


def fp32_path_for(qdq_path: str | Path) -> Path:
    """Where the FP32 baseline of ``model.onnx`` goes: ``model.fp32.onnx`` beside it."""
    p = Path(qdq_path)
    return p.with_name(p.stem + ".fp32" + (p.suffix or ".onnx"))


def save_onnx(model: onnx.ModelProto, path: str | Path, force: bool) -> Path:
    """Write an ONNX file atomically.

    Args:
        model: the model.
        path: destination.
        force: replace an existing file.

    Returns:
        The path written.
    """
    with atomic_file(path, force=force) as tmp:
        onnx.save(model, str(tmp))
    return Path(path)


def export_recipe(recipe_dir: str | Path, target: str, out: str | Path, *, force: bool = False,
                  opset: int = DEFAULT_OPSET, check: bool = True, erf_encoding: str = "erf") -> tuple[Path, Path, list]:
    """Export a recipe folder for a target: the QDQ file and the FP32 baseline beside it.

    Args:
        recipe_dir: the recipe folder.
        target: export target.
        out: the QDQ ONNX path (the FP32 file is written as ``<stem>.fp32.onnx`` beside it).
        force: overwrite existing files.
        opset: ONNX opset.
        check: run the target-rule checker first and refuse to write a file that breaks a rule.
        erf_encoding: how aligned activation points are written (``erf`` or ``lookup``, see build_qdq_model).

    Returns:
        (QDQ path, FP32 path, list of checker violations found).
    """
    out = Path(out)
    fp32_out = fp32_path_for(out)
    check_output_free(out, force)
    check_output_free(fp32_out, force)
    recipe = QuantRecipe.load(recipe_dir)
    meta = {"qexport.recipe_sha256": recipe_fingerprint(recipe_dir)}
    qdq = build_qdq_model(recipe, target, opset, meta, erf_encoding)
    violations = []
    if check:
        from qexport.export.check import check_model

        violations = check_model(qdq, target)
        if violations:
            raise QexportError(f"the exported model breaks {len(violations)} {target} rule(s), nothing written; "
                               f"first: {violations[0]}")
    fp32 = build_fp32_model(recipe, opset, meta)
    save_onnx(qdq, out, force)
    save_onnx(fp32, fp32_out, force)
    return out, fp32_out, violations
