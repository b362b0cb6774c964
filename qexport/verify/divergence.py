"""Per-layer divergence: the first plan point where an engine stops computing what QuantSim computes.

Every activation point of the plan is a Q/DQ pair in the exported file, whose Q output (``<point>.q``) holds the
integer codes the engine really uses. This module exposes those tensors as extra outputs of the engine (the
engine folder's own model: ORT's optimized file, OpenVINO's IR), runs a few images through it and through
QuantSim, and compares the codes point by point, in plan (graph) order, in units of quantization steps.

Float engines and QuantSim never agree to the last bit: a value that lies within float rounding of a rounding
boundary flips by one step, and flips propagate and grow a little from block to block (with fp32 everywhere,
about 1 % of codes differ by one step at the end of ResNet-20, a few by 2-4 steps). A point therefore
*departs* when more than ``tolerance`` of its codes (default 0.5 %) are more than one step away from QuantSim,
or when the mean absolute difference exceeds ``mean_steps`` (default 0.5 step). A wrong scale, a wrong zero
point, a layer computed at a lower precision, a missing bias all depart at once, by many steps, on many
values; the first point that departs names the layer to look at.

Runtimes expose the tensors through their runner class's public ``expose_tensors`` (``onnxruntime`` and
``openvino`` do; a runtime that cannot returns None and the report says so). Adding outputs can change how
a runtime fuses the graph; the report says how far the exposed engine's final output moved from the plain
engine's (``exposed_output_max_diff``), so a reader knows how faithful the per-point codes are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

DEFAULT_TOLERANCE = 0.005
DEFAULT_MEAN_STEPS = 0.5


def _sim_codes(sim, x: torch.Tensor) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """QuantSim's integer codes at every activation point (clamped levels, zero point 0) and its output."""
    codes: dict[str, np.ndarray] = {}
    handles = []
    for name, aq in sim.act_quantizers().items():
        def hook(mod, inp, out, name=name, aq=aq):
            if aq.enabled:
                # The output's codes: for an aligned (erf) point these are the outgoing codes, not its input's.
                codes[name] = torch.clamp(torch.round(out / aq.scale), aq.spec.qmin, aq.spec.qmax).numpy()
        handles.append(aq.register_forward_hook(hook))
    try:
        with torch.no_grad():
            y = sim(x).numpy()
    finally:
        for h in handles:
            h.remove()
    return codes, y


def _point_stats(eng: np.ndarray, ref: np.ndarray) -> dict:
    d = np.abs(eng.astype(np.int64) - ref.astype(np.int64)).ravel()
    return {"values": int(d.size), "frac_diff": float((d > 0).mean()), "frac_beyond_one_step": float((d > 1).mean()),
            "mean_abs_steps": float(d.mean()), "max_abs_steps": int(d.max()) if d.size else 0}


def first_divergent_layer(engine_dir: str | Path, recipe, sim, dataset, indices: Sequence[int], *,
                          tolerance: float = DEFAULT_TOLERANCE, mean_steps: float = DEFAULT_MEAN_STEPS,
                          batch_size: int = 32, threads: int | None = None) -> dict:
    """Name the first activation point (and its layer) whose engine codes depart from QuantSim's.

    Args:
        engine_dir: an engine folder of a runtime whose runner exposes tensors (``onnxruntime``, ``openvino``).
        recipe: the QuantRecipe the engine was exported from.
        sim: its QuantSim (eval mode).
        dataset: a dataset of (image tensor, label) pairs.
        indices: which images (a few dozen suffice).
        tolerance: a point departs when more than this fraction of its codes are more than one step off.
        mean_steps: ... or when the mean absolute difference exceeds this many steps.
        batch_size: images per engine call.
        threads: runtime threads (None: the engine's).

    Returns:
        ``summary`` (one line), ``point`` / ``layer`` / ``producer`` (None when nothing departs), ``points``
        (per-point stats in plan order), ``criterion``, ``images``, ``target``, ``exposed_output_max_diff``.
    """
    from qexport.data import iter_batches
    from qexport.quant.targets import get_target
    from qexport.runtimes import get_runtime, load_engine, read_engine_meta

    engine_dir = Path(engine_dir)
    meta = read_engine_meta(engine_dir, which="int8")
    target = meta["target"]
    criterion = (f"a point departs when > {100 * tolerance:g} % of its codes are more than one quantization step "
                 f"from QuantSim, or their mean difference exceeds {mean_steps:g} step")
    base = {"target": target, "criterion": criterion, "images": len(indices), "point": None, "layer": None,
            "producer": None, "points": []}
    plan = recipe.plan
    names = [f"{ap.name}.q" for ap in plan.activations]
    probe = get_runtime(target).runner.expose_tensors(engine_dir, names, threads)
    if probe is None:
        return {**base, "summary": f"per-layer divergence is not available for {target} engines"}
    run, exposed = probe
    export_target = get_target((meta.get("source_metadata") or {}).get("qexport.target") or plan.target)
    zero_point = {ap.name: export_target.act_encoding(ap.spec)[1] for ap in plan.activations}
    plain = load_engine(engine_dir, "int8", threads)

    eng_codes, sim_codes, out_diff = _collect_codes(run, exposed, plain, sim, plan, zero_point,
                                                    export_target.code_clip, iter_batches(dataset, batch_size, list(indices)))
    rows, first, checked = _point_rows(plan, eng_codes, sim_codes, exposed, tolerance, mean_steps)
    base.update(points=rows, exposed_output_max_diff=out_diff)
    if first is None:
        base["summary"] = _agreeing_summary(rows, target, len(indices))
        return base
    base.update(point=first["point"], layer=(first["layers"] or [None])[0], producer=first["point"])
    where = f"input of {', '.join(first['layers'])}" if first["layers"] else f"{first['role']} input of an Add"
    if "shape_mismatch" in first:
        detail = f"shape {first['shape_mismatch'][0]} vs QuantSim {first['shape_mismatch'][1]}"
    else:
        detail = (f"{100 * first['frac_beyond_one_step']:.2f} % of codes more than one step off QuantSim, mean "
                  f"{first['mean_abs_steps']:.2f}, max {first['max_abs_steps']} steps")
    base["summary"] = (f"first divergent layer: activation point '{first['point']}' ({where}) of the {target} "
                       f"engine: {detail}; the {checked - 1} points before it agree within one step "
                       f"({len(indices)} images)")
    return base


def _collect_codes(run, exposed, plain, sim, plan, zero_point: dict, code_clip: bool, batches):
    """Every activation point's integer codes from the engine (exposed tensors) and from QuantSim.

    A point the engine does not expose is read from the point it shares its scale with, when that one is.

    Returns:
        ``(engine codes per point, QuantSim codes per point, largest |output difference| between the exposing
        and the plain engine)``; codes are lists of per-batch arrays.
    """
    eng_codes: dict[str, list] = {}
    sim_codes: dict[str, list] = {}
    out_diff = 0.0
    sim.eval()
    for x, _ in batches:
        xn = x.numpy().astype(np.float32)
        res = run(xn)
        out_diff = max(out_diff, float(np.abs(res["__output__"] - plain.infer(xn)).max()))
        sc, _ = _sim_codes(sim, x)
        for ap in plan.activations:
            sim_codes.setdefault(ap.name, []).append(sc[ap.name])
            src = ap.name if f"{ap.name}.q" in exposed else ap.share_scale_with
            if src is not None and f"{src}.q" in exposed:
                codes = res[f"{src}.q"].astype(np.int64) - zero_point[src]
                if code_clip:  # the exposed tensor is Q's output; the Clip on the codes follows it
                    codes = np.clip(codes, ap.spec.qmin, ap.spec.qmax)
                eng_codes.setdefault(ap.name, []).append(codes)
    return eng_codes, sim_codes, out_diff


def _point_rows(plan, eng_codes: dict, sim_codes: dict, exposed, tolerance: float, mean_steps: float):
    """Per-point agreement rows in plan order, the first departing row, and how many rows were checked up to it.

    Returns:
        ``(rows, first departing row or None, points checked up to and including it)``.
    """
    consumers: dict[str, list[str]] = {}
    for lp in plan.layers:
        if lp.input_point:
            consumers.setdefault(lp.input_point, []).append(lp.name)
    rows, first, checked = [], None, 0
    for ap in plan.activations:
        row = {"point": ap.name, "role": ap.role, "bits": ap.spec.bits, "layers": consumers.get(ap.name, [])}
        if ap.name not in eng_codes:
            row["exposed"] = False
            rows.append(row)
            continue
        e, s = np.concatenate(eng_codes[ap.name]), np.concatenate(sim_codes[ap.name])
        if e.shape != s.shape:
            row.update(exposed=True, shape_mismatch=[list(e.shape), list(s.shape)], departs=True)
        else:
            row.update(exposed=True, **_point_stats(e, s))
            row["departs"] = row["frac_beyond_one_step"] > tolerance or row["mean_abs_steps"] > mean_steps
        if ap.share_scale_with and f"{ap.name}.q" not in exposed:
            row["read_from"] = ap.share_scale_with
        rows.append(row)
        if first is None:
            checked += 1
            if row["departs"]:
                first = row
    return rows, first, checked


def _agreeing_summary(rows: list[dict], target: str, n_images: int) -> str:
    """The one-line summary when no point departs, naming the point closest to departing."""
    shown = [r for r in rows if r.get("exposed")]
    worst = max(shown, key=lambda r: r.get("frac_beyond_one_step", 0), default=None)
    tail = (f"; largest: {worst['point']} with {100 * worst['frac_beyond_one_step']:.3f} % of codes beyond one "
            f"step" if worst else "")
    return (f"no layer departs from QuantSim: all {len(shown)} exposed activation points of the {target} engine "
            f"stay within one quantization step on {n_images} images{tail}")
