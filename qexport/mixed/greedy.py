"""``--bits auto --allocator greedy``: per-layer weight widths chosen by measuring the whole mixed model.

The knapsack of :mod:`qexport.mixed.allocate` adds per-layer losses measured one layer at a time. On ResNet-20
that misjudges what several 4-bit layers cost together (docs/mixed_precision.md: it did no better than random
allocations). The greedy allocator measures the model as it will be: every layer starts at the lowest width,
and each round raises the one layer (to one of the higher widths) that lowers the output loss of the *whole*
weight-quantized model most per added weight bit, until the budget is spent or no raise helps. Weights are
fake-quantized with the same per-channel mse scales the recipe's ``mse`` calibration uses, activations stay in
float (they do not change which weights matter), and the loss is the output KL (or logit MSE) against the float
model on calibration images, so no label is needed. ``--allocator labels`` runs the same search on the
cross-entropy of labelled images outside the calibration subset instead: the loss the deployed model is judged
by, rather than its distance from the float model (which, at these widths, does not order allocations as top-1
does: docs/mixed_precision.md).

Cost: one forward pass over the images per measured raise. The search is lazy: a raise's last measured gain per
bit bounds its gain now (raising other layers seldom makes a raise more useful), so each round re-measures
only the candidates that reach the top, not every layer at every width.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from qexport.calibrators.base import set_weight_scales
from qexport.errors import QexportError
from qexport.mixed.sensitivity import batched_logits, output_loss
from qexport.progress import progress_bar
from qexport.quant.plan import build_plan
from qexport.quant.quantsim import QuantSim
from qexport.quant.spec import BitsConfig


def candidate_widths(budget_bits_avg: float, floor: bool = True) -> tuple[int, ...]:
    """The widths the greedy allocators choose from at a mean budget: the floor of the mean, the next two, 8;
    without ``floor``, one bit below the floor too (so some layers can pay for others at an equal size).

    Args:
        budget_bits_avg: mean weight bits.
        floor: no width below the floor of the mean.

    Returns:
        Sorted widths, e.g. (4, 5, 6, 8) at 4.5, (3, 4, 5, 6, 8) at 4.0 without the floor.
    """
    low = max(1, min(8, int(budget_bits_avg + 1e-9)))
    below = () if floor or low == 1 else (low - 1,)
    return tuple(sorted({*below, low, min(low + 1, 8), min(low + 2, 8), 8}))


def fake_quantized_weights(folded, target: str, widths, keep_float) -> dict[int, dict[str, torch.Tensor]]:
    """Every layer's fake-quantized weight at every width (per-channel mse scales, as ``mse`` sets them).

    Args:
        folded: the BN-folded float model.
        target: plan target.
        widths: weight widths.
        keep_float: layers left in float.

    Returns:
        width -> layer -> weight.
    """
    out = {}
    for w in widths:
        sim = QuantSim(folded, build_plan(folded, target, BitsConfig(w, None), tuple(keep_float)))
        set_weight_scales(sim, "mse")
        with torch.no_grad():
            out[w] = {n: layer.weight_quantizer(layer.weight).detach().clone() for n, layer in sim.layers().items()}
    return out


class MixedWidthModel:
    """The float model with each layer's weight replaced by its fake-quantized weight at the width ``set`` chose;
    ``loss()`` is the output loss against the float model on ``data`` or, with ``labels``, the cross-entropy."""

    def __init__(self, folded, quantized: dict[int, dict[str, torch.Tensor]], data: torch.Tensor, metric: str,
                 batch_size: int, labels: torch.Tensor | None = None):
        self.model = copy.deepcopy(folded).eval()
        self.quantized, self.data, self.metric, self.batch_size = quantized, data, metric, batch_size
        self.labels = labels
        self.ref = self.logits() if labels is None else None

    def logits(self) -> torch.Tensor:
        return batched_logits(self.model, self.data, self.batch_size)

    def set(self, layer: str, width: int) -> None:
        with torch.no_grad():
            self.model.get_submodule(layer).weight.copy_(self.quantized[width][layer])

    def loss(self) -> float:
        if self.labels is not None:
            return float(F.cross_entropy(self.logits().double(), self.labels))
        return output_loss(self.ref, self.logits(), self.metric)


def greedy_allocation(folded, target: str, data: torch.Tensor, budget_bits: float, *,
                      widths: tuple[int, ...] = (4, 5, 6, 8), metric: str = "kl", keep_float: tuple[str, ...] = (),
                      batch_size: int = 128, labels: torch.Tensor | None = None, quiet: bool = False) -> dict:
    """Per-layer weight widths under a budget, raised greedily by measured gain per bit (module docstring).

    Args:
        folded: the BN-folded float model.
        target: plan target (which layers are quantized).
        data: the images the loss is measured on (calibration images, or labelled held-out ones).
        budget_bits: total integer weight bits allowed (mean bits x weight count, or 8 x bytes).
        widths: the widths to choose from; every layer starts at the lowest.
        metric: ``kl`` or ``mse`` of the logits against the float model (ignored with ``labels``).
        keep_float: layers left in float.
        batch_size: images per forward pass.
        labels: labels of ``data``: minimise their cross-entropy instead of the distance from the float model.
        quiet: no progress bar.

    Returns:
        ``{"widths": {layer: bits}, "loss": final output loss, "rounds": [{layer, bits, loss}], "evaluations":
        forward passes measured}``.

    Raises:
        QexportError: the budget is below every layer at the lowest width (the message gives that minimum).
    """
    widths = tuple(sorted(set(widths)))
    quantized = fake_quantized_weights(folded, target, widths, keep_float)
    numel = {n: int(w.numel()) for n, w in quantized[widths[0]].items()}
    cur = {n: widths[0] for n in numel}
    spent = sum(numel[n] * widths[0] for n in numel)
    if spent > budget_bits + 1e-6:
        total = sum(numel.values())
        raise QexportError(f"the weight budget is below every layer at {widths[0]} bits ({spent / total:.2f} mean "
                           f"weight bits, {spent / 8192:.2f} KB); raise the budget")
    mixed = MixedWidthModel(folded, quantized, data, metric, batch_size, labels)
    for n, w in cur.items():
        mixed.set(n, w)
    with progress_bar(None, "greedy widths", quiet) as bar:
        loss, rounds, evals = _lazy_greedy(mixed, numel, widths, cur, budget_bits - spent, bar)
    return {"widths": cur, "loss": loss, "rounds": rounds, "evaluations": evals}


def _lazy_greedy(mixed: MixedWidthModel, numel: dict[str, int], widths: tuple[int, ...], cur: dict[str, int],
                 room: float, bar) -> tuple[float, list[dict], int]:
    """Raise layers of ``mixed`` (``cur`` is updated in place) while ``room`` bits last and a raise helps.

    A raise's last measured gain per bit bounds its gain now (raising other layers seldom makes a raise more
    useful), so only the candidate on top is re-measured, until a freshly measured one stays on top.

    Returns:
        (final loss, the accepted raises in order, forward passes measured).
    """
    loss, rounds, evals = mixed.loss(), [], 0
    bound: dict[tuple[str, int], tuple[float, int]] = {(n, w): (float("inf"), -1) for n in numel for w in widths}
    trial_loss: dict[tuple[str, int], float] = {}
    while True:
        live = [(g, n, w, at) for (n, w), (g, at) in bound.items()
                if w > cur[n] and numel[n] * (w - cur[n]) <= room + 1e-6]
        if not live:
            break
        g, n, w, at = max(live, key=lambda c: (c[0], c[1], c[2]))
        if at != len(rounds):  # stale: measure it now
            mixed.set(n, w)
            trial_loss[(n, w)] = trial = mixed.loss()
            mixed.set(n, cur[n])
            evals += 1
            bound[(n, w)] = ((loss - trial) / (numel[n] * (w - cur[n])), len(rounds))
            bar.advance(1, info=f"raised {len(rounds)} loss {loss:.4g}")
            continue
        if g <= 0:
            break
        room -= numel[n] * (w - cur[n])
        cur[n], loss = w, trial_loss[(n, w)]
        mixed.set(n, w)
        rounds.append({"layer": n, "bits": w, "loss": float(f"{loss:.6g}")})
        for key in bound:  # this layer's other raises now cost and gain differently
            if key[0] == n:
                bound[key] = (float("inf"), -1)
    return loss, rounds, evals
