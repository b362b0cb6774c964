"""Per-layer sensitivity: what quantizing one layer alone, at a low width, costs the model's output.

For each probe width ``wNaM`` the whole model gets a plan at that width and ``mse`` scales (weights per channel,
activations per tensor on the calibration images), then everything but one quantizer is switched off and the
output is compared with the float model's on the calibration images:

- ``weight``: only that layer's weights quantized;
- ``act``: only its input tensor quantized (a tensor shared by several layers is measured once);
- ``both``: both.

The loss is the mean KL divergence of the softmax outputs (``kl``, default) or the mean squared logit error
(``mse``); with labelled held-out images (training images outside the calibration subset) the top-1 drop of
``both`` is measured too. The table ranks layers by ``both`` at the first probe width; ``qexport calibrate --bits
auto`` reads it (qexport/mixed/allocate.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qexport.calibrators.base import calibrate_activations, set_weight_scales
from qexport.errors import QexportError
from qexport.progress import progress_bar
from qexport.quant.layer_bits import parse_width
from qexport.quant.plan import build_plan
from qexport.quant.quantsim import QuantSim
from qexport.quant.spec import BitsConfig

METRICS = ("kl", "mse")
TABLE_FORMAT = "qexport-sensitivity"


def output_loss(ref: torch.Tensor, out: torch.Tensor, metric: str) -> float:
    """Distance of quantized logits ``out`` from float logits ``ref``.

    Args:
        ref: float logits (N, classes).
        out: quantized logits.
        metric: ``kl`` (mean KL(float || quantized) of the softmax) or ``mse`` (mean squared logit error).

    Returns:
        The loss (>= 0).
    """
    if metric == "kl":
        return float(F.kl_div(F.log_softmax(out.double(), 1), F.log_softmax(ref.double(), 1), log_target=True,
                              reduction="batchmean"))
    return float(((out.double() - ref.double()) ** 2).mean())


def batched_logits(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model(x)`` without gradients, ``batch_size`` images at a time."""
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def parse_probe_widths(text: str) -> list[tuple[int, int | None]]:
    """``w4a4`` or ``w3a4,w4a4,w6a6`` -> [(w, a), ...] (sorted by weight bits, duplicates dropped)."""
    widths = sorted({parse_width(t, "sensitivity --bits") for t in text.split(",") if t.strip()},
                    key=lambda wa: (wa[0], wa[1] or 32))
    if not widths:
        raise QexportError("sensitivity --bits needs at least one width, e.g. w4a4")
    kinds = {a is None for _, a in widths}
    if len(kinds) > 1:
        raise QexportError("sensitivity --bits mixes weights-only and quantized-activation widths; use one kind")
    return widths


class _Probe:
    """One probe width: the calibrated QuantSim with every quantizer switched off but the one under test."""

    def __init__(self, folded, target: str, w: int, a: int | None, data: torch.Tensor, keep_float, seed: int,
                 batch_size: int):
        self.plan = build_plan(folded, target, BitsConfig(w, a), tuple(keep_float))
        self.sim = QuantSim(folded, self.plan).eval()
        set_weight_scales(self.sim, "mse")
        if a is not None:
            calibrate_activations(self.sim, data, "mse", batch_size=batch_size, quiet=True, seed=seed)
        self.batch_size = batch_size

    def only(self, x: torch.Tensor, layer: str | None, point: str | None) -> torch.Tensor:
        """Logits with only ``layer``'s weights and ``point``'s activation quantizer on."""
        layers, aqs = self.sim.layers(), self.sim.act_quantizers()
        with self.sim.quant_disabled():
            if layer is not None:
                layers[layer].weight_quantizer.enabled = True
            if point is not None:
                for name, aq in aqs.items():  # points sharing this one's scale move with it
                    if name == point or self.plan.activation(name).share_scale_with == point:
                        aq.enabled = True
            return batched_logits(self.sim, x, self.batch_size)


def measure_sensitivity(folded, target: str, widths: list[tuple[int, int | None]], data: torch.Tensor, *,
                        heldout: tuple[torch.Tensor, torch.Tensor] | None = None, metric: str = "kl",
                        keep_float: tuple[str, ...] = (), seed: int = 0, batch_size: int = 64,
                        quiet: bool = False) -> dict:
    """The sensitivity table of a BN-folded model.

    Args:
        folded: the BN-folded float model (fx GraphModule).
        target: plan target (placement of the activation points).
        widths: probe widths [(weight bits, activation bits or None)].
        data: calibration images (scales and the loss).
        heldout: labelled held-out images for the top-1 drop (optional).
        metric: ``kl`` or ``mse``.
        keep_float: layers left in float.
        seed: seed of the activation sample.
        batch_size: images per forward pass.
        quiet: no progress bar.

    Returns:
        ``{"format", "metric", "widths", "layers": [{layer, kind, weights, input_point, input_elems, loss: {width:
        {weight, act, both[, top1_drop]}}}], "points": {point: layers}}``, layers ranked by ``both`` at widths[0].
    """
    if metric not in METRICS:
        raise QexportError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
    folded = folded.eval()
    ref = batched_logits(folded, data, batch_size)
    ref_ho = batched_logits(folded, heldout[0], batch_size) if heldout is not None else None
    rows: dict[str, dict] = {}
    probes = [(w, a, _Probe(folded, target, w, a, data, keep_float, seed, batch_size)) for w, a in widths]
    plan = probes[0][2].plan
    elems = _input_elements(probes[0][2].sim, data[:1])
    for i, lp in enumerate(plan.layers):
        rows[lp.name] = {"layer": lp.name, "index": i, "kind": lp.kind, "weights": int(folded.get_submodule(lp.name).weight.numel()),
                         "input_point": lp.input_point, "input_elems": elems.get(lp.input_point), "loss": {}}
    total = len(probes) * len(plan.layers)
    with progress_bar(total, "sensitivity", quiet) as bar:
        for w, a, probe in probes:
            label = f"w{w}a{a if a else 32}"
            act_cache: dict[str, float] = {}
            for lp in probe.plan.layers:
                cell = {"weight": output_loss(ref, probe.only(data, lp.name, None), metric)}
                if lp.input_point is not None:
                    if lp.input_point not in act_cache:
                        act_cache[lp.input_point] = output_loss(ref, probe.only(data, None, lp.input_point), metric)
                    cell["act"] = act_cache[lp.input_point]
                cell["both"] = output_loss(ref, probe.only(data, lp.name, lp.input_point), metric)
                if heldout is not None:
                    out = probe.only(heldout[0], lp.name, lp.input_point)
                    cell["top1_drop"] = 100.0 * float((ref_ho.argmax(1) == heldout[1]).double().mean()
                                                      - (out.argmax(1) == heldout[1]).double().mean())
                rows[lp.name]["loss"][label] = cell
                bar.advance(1, info=f"{label} {lp.name}")
    first = f"w{widths[0][0]}a{widths[0][1] if widths[0][1] else 32}"
    ranked = sorted(rows.values(), key=lambda r: -r["loss"][first]["both"])
    points: dict[str, list[str]] = {}
    for lp in plan.layers:
        if lp.input_point:
            points.setdefault(lp.input_point, []).append(lp.name)
    return {"format": TABLE_FORMAT, "version": 1, "metric": metric, "target": target,
            "widths": [f"w{w}a{a if a else 32}" for w, a in widths], "images": int(data.shape[0]),
            "heldout_images": int(heldout[0].shape[0]) if heldout is not None else 0,
            "layers": ranked, "points": points}


def _input_elements(sim: QuantSim, x: torch.Tensor) -> dict[str, int]:
    """Elements per image of every activation point's tensor (one forward pass)."""
    sizes: dict[str, int] = {}
    handles = []
    for name, aq in sim.act_quantizers().items():
        handles.append(aq.register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, i[0][0].numel())))
    try:
        with sim.quant_disabled():
            batched_logits(sim, x, 1)
    finally:
        for h in handles:
            h.remove()
    return sizes
