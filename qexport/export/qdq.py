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

import onnx
import torch

from qexport import __version__
from qexport.errors import QexportError
from qexport.quant.markers import DOMAIN
from qexport.fileio import atomic_file, check_output_free
from qexport.quant.targets import get_target
from qexport.export.qdq_graph import GraphEditor, act_encoding  # noqa: F401 - act_encoding is part of this module's API
from qexport.recipe import QuantRecipe

DEFAULT_OPSET = 17
ERF_ENCODINGS = ("erf", "lookup")  # how aligned (AlignQ) activation points are written; see qdq_graph.GraphEditor._aligned
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
    model = GraphEditor(model, recipe, target, erf_encoding).rewrite()
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
