"""``--bits auto``: per-layer widths from a sensitivity table under a budget (a multiple-choice knapsack).

Weights and activations are allocated separately:

- weights: each layer takes one of the probe widths of the table or 8 bits; its cost is weights x bits, its
  loss the table's ``weight`` loss at that width (0 at 8 bits unless measured). The budget is a mean weight
  width (``--weight-bits-avg``, weighted by weight count) or a size (``--size-kb`` of integer weights).
- activations: each quantized input tensor (shared by the layers it feeds) takes a probe width or 8; cost is
  its elements per image x bits, loss the table's ``act`` loss; budget ``--act-bits-avg``. Without it every
  input stays at 8 bits. Residual Add inputs (not a layer's input) stay at 8 bits.

Per-layer losses are treated as additive (the usual first-order assumption); the sum is minimised exactly by
dynamic programming over the cost discretised into a few thousand steps (costs rounded up, so the budget holds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from qexport.errors import QexportError
from qexport.quant.layer_bits import parse_width
from qexport.quant.spec import BitsConfig

DEFAULT_PROBE = "w3a4,w4a4,w6a6"
ALLOCATORS = ("knapsack", "greedy", "labels")
GREEDY_ALLOCATORS = ("greedy", "labels")  # whole-model searches (qexport/mixed/greedy.py): weight widths only
DEFAULT_HELDOUT_IMAGES = 1000
AUTO_ONLY_FLAGS = ("--weight-bits-avg, --act-bits-avg, --size-kb, --sensitivity, --allocator, --heldout-images and "
                   "--floor/--no-floor go with --bits auto")
_STEPS = 4000


@dataclass(frozen=True)
class AutoBitsConfig:
    """Budget of ``--bits auto``."""

    weight_bits_avg: float | None = field(default=None, metadata={"help": "mean weight bits (by weight count)"})
    act_bits_avg: float | None = field(default=None, metadata={"help": "mean input bits (by tensor size)"})
    size_kb: float | None = field(default=None, metadata={"help": "integer weights budget in KB (1024 bytes)"})
    sensitivity: str | None = field(default=None, metadata={"help": "sensitivity.json (default: measured now)"})
    probe: str = field(default=DEFAULT_PROBE, metadata={"help": "widths measured when no table is given"})
    floor: bool = field(default=True, metadata={"help": "no layer below the floor of the mean budget"})
    allocator: str = field(default="knapsack", metadata={"help": "knapsack (per-layer sensitivity table), greedy "
                                                                 "(whole-model loss, qexport/mixed/greedy.py) or "
                                                                 "labels (greedy on held-out cross-entropy)"})
    heldout_images: int | None = field(default=None, metadata={
        "help": "--allocator labels: labelled images after the calibration subset (default 1000)"})

    def __post_init__(self) -> None:
        if self.weight_bits_avg is None and self.act_bits_avg is None and self.size_kb is None:
            raise QexportError("--bits auto needs a budget: --weight-bits-avg 4.5, --size-kb 100 or --act-bits-avg 6")
        for name, v in (("--weight-bits-avg", self.weight_bits_avg), ("--act-bits-avg", self.act_bits_avg)):
            if v is not None and not 1.0 <= v <= 8.0:
                raise QexportError(f"{name} must be in 1..8, got {v}")
        if self.size_kb is not None and self.size_kb <= 0:
            raise QexportError(f"--size-kb must be positive, got {self.size_kb}")
        if self.allocator not in ALLOCATORS:
            raise QexportError(f"--allocator {self.allocator!r} is not one of {', '.join(ALLOCATORS)}")
        self._check_greedy()

    def _check_greedy(self) -> None:
        a = self.allocator
        if self.heldout_images is not None and a != "labels":
            raise QexportError("--heldout-images goes with --allocator labels")
        if self.heldout_images is not None and self.heldout_images < 1:
            raise QexportError(f"--heldout-images must be positive, got {self.heldout_images}")
        if a not in GREEDY_ALLOCATORS:
            return
        if self.act_bits_avg is not None:
            raise QexportError(f"--allocator {a} chooses weight widths only; for --act-bits-avg use "
                               "--allocator knapsack")
        if self.weight_bits_avg is None and self.size_kb is None:
            raise QexportError(f"--allocator {a} needs a weight budget: --weight-bits-avg or --size-kb")
        if self.sensitivity is not None:
            raise QexportError(f"--allocator {a} measures the whole model and reads no --sensitivity table; drop "
                               "one of the two")

    @property
    def heldout_count(self) -> int:
        """Labelled held-out images ``--allocator labels`` measures on."""
        return self.heldout_images or DEFAULT_HELDOUT_IMAGES


def weight_budgets(weight_bits_avg: float | None, size_kb: float | None, total: int) -> list[tuple[float, str]]:
    """The weight budgets given, in integer weight bits, each with the flag that set it (the tighter one holds).

    Args:
        weight_bits_avg: mean weight bits, or None.
        size_kb: integer weights in KB, or None.
        total: weight count of the quantized layers.

    Returns:
        [(bits, flag)].
    """
    out = []
    if weight_bits_avg is not None:
        out.append((weight_bits_avg * total, f"--weight-bits-avg {weight_bits_avg:g}"))
    if size_kb is not None:
        out.append((size_kb * 1024 * 8, f"--size-kb {size_kb:g}"))
    return out


def knapsack(items: list[list[tuple[float, float, int]]], budget: float) -> list[int] | None:
    """Multiple-choice knapsack: one choice per item, total cost <= budget, least total loss.

    Args:
        items: per item, its choices ``(cost, loss, value)``.
        budget: the cost budget.

    Returns:
        The chosen ``value`` per item, or None when no choice fits.
    """
    top = sum(max(c for c, _, _ in ch) for ch in items)
    unit = max(top / _STEPS, 1e-12)
    cap = int(math.floor(budget / unit + 1e-9))
    if cap < 0:
        return None
    dp = np.full(cap + 1, np.inf)
    dp[0] = 0.0
    picks = []
    for ch in items:
        new = np.full(cap + 1, np.inf)
        arg = np.full(cap + 1, -1, dtype=np.int64)
        for k, (cost, loss, _) in enumerate(ch):
            c = int(math.ceil(cost / unit - 1e-9))
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = dp[: cap + 1 - c] + loss
            better = cand < new
            new[better], arg[better] = cand[better], k
        dp = new
        picks.append(arg)
    if not np.isfinite(dp).any():
        return None
    pos = int(np.argmin(dp))
    chosen = []
    for ch, arg in zip(reversed(items), reversed(picks)):
        k = int(arg[pos])
        chosen.append(ch[k][2])
        pos -= int(math.ceil(ch[k][0] / unit - 1e-9))
    return list(reversed(chosen))


def _choices(row: dict, kind: str, widths: list[tuple[int, int | None]], labels: list[str]) -> dict[int, float]:
    out: dict[int, float] = {}
    for (w, a), label in zip(widths, labels):
        b = w if kind == "weight" else a
        cell = row["loss"][label]
        if b is not None and kind in cell:
            out[b] = min(out.get(b, math.inf), cell[kind])
    out.setdefault(8, 0.0)
    return out


def _floored(items, budget: float, total: int) -> list:
    """Drop the choices below the floor of the mean width the budget allows, when that stays feasible.

    The knapsack adds per-layer losses; several layers far below the mean cost more together than their sum
    (ResNet-20, mse, mean 4.5 weight bits from {3, 4, 6, 8}: see docs/mixed_precision.md), so by default no layer
    goes below the floor of the mean.
    """
    low = int(math.floor(budget / max(total, 1) + 1e-9))
    kept = [[c for c in ch if c[2] >= low] or [max(ch, key=lambda c: c[2])] for ch in items]
    return kept if sum(min(c for c, _, _ in ch) for ch in kept) <= budget else items


def allocate(table: dict, *, weight_bits_avg: float | None = None, size_kb: float | None = None,
             act_bits_avg: float | None = None, floor: bool = True) -> dict:
    """Choose per-layer widths from a sensitivity table.

    Args:
        table: the sensitivity table (qexport/mixed/sensitivity.py).
        weight_bits_avg: mean weight bits budget.
        size_kb: integer weight budget in KB.
        act_bits_avg: mean input bits budget (None: inputs at 8 bits).
        floor: no width below the floor of the mean budget (when that is feasible).

    Returns:
        ``{"layers": {name: (w, a)}, "mean_weight_bits", "weight_kb", "mean_act_bits", "predicted_loss"}``.
    """
    labels = table["widths"]
    widths = [parse_width(t, "sensitivity table") for t in labels]
    rows = sorted(table["layers"], key=lambda r: r["layer"])
    total_w = sum(r["weights"] for r in rows)
    budgets = weight_budgets(weight_bits_avg, size_kb, total_w)
    w_items = [[(r["weights"] * b, loss, b) for b, loss in sorted(_choices(r, "weight", widths, labels).items())]
               for r in rows]
    w_pick = [8] * len(rows)
    if budgets:
        budget, flag = min(budgets)
        w_items = _floored(w_items, budget, total_w) if floor else w_items
        w_pick = _solve(w_items, budget, flag, total_w, "weight bits", lambda bits: f"{bits / total_w:.2f} mean "
                        f"weight bits, {bits / 8192:.2f} KB")
    point_rows = {}
    for r in rows:
        if r.get("input_point"):
            point_rows.setdefault(r["input_point"], r)
    points = sorted(point_rows)
    a_pick = {p: 8 for p in points}
    if act_bits_avg is not None and points:
        a_items = [[(point_rows[p]["input_elems"] * b, loss, b)
                    for b, loss in sorted(_choices(point_rows[p], "act", widths, labels).items())] for p in points]
        total_a = sum(point_rows[p]["input_elems"] for p in points)
        a_items = _floored(a_items, act_bits_avg * total_a, total_a) if floor else a_items
        picks = _solve(a_items, act_bits_avg * total_a, f"--act-bits-avg {act_bits_avg:g}", total_a, "input bits",
                       lambda bits: f"{bits / total_a:.2f} mean input bits")
        a_pick = dict(zip(points, picks))
    return _summary(rows, w_items, w_pick, a_pick, point_rows)


def _solve(items, budget: float, flag: str, total: int, what: str, describe) -> list[int]:
    lowest = sum(min(c for c, _, _ in ch) for ch in items)
    if budget < lowest - 1e-6:
        raise QexportError(f"{flag} is below the smallest allocation the probe widths allow: {describe(lowest)} "
                           f"(every layer at its lowest width); raise the budget or probe lower widths")
    picks = knapsack(items, budget)
    if picks is None:  # only the rounding of costs can make an exactly feasible budget fail
        picks = [min(ch)[2] for ch in items]
    return picks


def _summary(rows, w_items, w_pick, a_pick, point_rows) -> dict:
    layers, loss = {}, 0.0
    for r, ch, w in zip(rows, w_items, w_pick):
        loss += next(l for _, l, b in ch if b == w)
        layers[r["layer"]] = (w, a_pick[r["input_point"]] if r.get("input_point") else None)
    total_w = sum(r["weights"] for r in rows)
    bits = sum(r["weights"] * layers[r["layer"]][0] for r in rows)
    elems = sum(point_rows[p]["input_elems"] for p in a_pick) or 1
    return {"layers": layers, "mean_weight_bits": bits / total_w, "weight_kb": bits / 8192,
            "mean_act_bits": sum(point_rows[p]["input_elems"] * a for p, a in a_pick.items()) / elems,
            "predicted_weight_loss": loss}


def bits_config(alloc: dict, quantized_acts: bool = True) -> BitsConfig:
    """The BitsConfig of an allocation: every layer named; defaults at the lowest weight width and 8-bit inputs."""
    entries = tuple((n, w, (a if a is not None else 8) if quantized_acts else None)
                    for n, (w, a) in sorted(alloc["layers"].items()))
    low = min(w for _, w, _ in entries)
    return BitsConfig(low, 8 if quantized_acts else None, None, entries)


def allocate_for_run(auto: AutoBitsConfig, model: str, folded, target: str, data, seed: int,
                     keep_float: tuple[str, ...], quiet: bool, heldout=None) -> tuple[BitsConfig, dict]:
    """``calibrate --bits auto``: read or measure the sensitivity table, allocate, return the BitsConfig.

    Args:
        auto: the budget.
        model: model spec (recorded).
        folded: the BN-folded model.
        target: plan target.
        data: calibration images (used when no table is given; at most 256 of them).
        seed: seed.
        keep_float: layers left in float.
        quiet: no progress bar.
        heldout: ``(images, labels)`` outside the calibration subset, for ``--allocator labels``.

    Returns:
        (the BitsConfig, a summary for the recipe's metrics).
    """
    from qexport.mixed.sensitivity import measure_sensitivity, parse_probe_widths
    from qexport.mixed.sensitivity_run import load_table

    if auto.allocator in GREEDY_ALLOCATORS:
        return _greedy_for_run(auto, folded, target, data, keep_float, quiet, heldout)
    if auto.sensitivity:
        table = load_table(auto.sensitivity)
    elif data is None:
        raise QexportError("--bits auto measures layer sensitivity on calibration images: pass --data DIR, or a "
                           "table from `qexport sensitivity` with --sensitivity")
    else:
        table = measure_sensitivity(folded, target, parse_probe_widths(auto.probe), data[:256], seed=seed,
                                    keep_float=keep_float, quiet=quiet)
    from qexport.quant.plan import build_plan

    names = {lp.name for lp in build_plan(folded, target, BitsConfig(8, 8), tuple(keep_float)).layers}
    have = {r["layer"] for r in table["layers"]}
    if names != have:
        odd = sorted(names ^ have)[:3]
        raise QexportError(f"sensitivity table {auto.sensitivity} does not fit this model's layers (e.g. "
                           f"{', '.join(odd)}); measure it for this model with `qexport sensitivity`")
    alloc = allocate(table, weight_bits_avg=auto.weight_bits_avg, size_kb=auto.size_kb,
                     act_bits_avg=auto.act_bits_avg, floor=auto.floor)
    bits = bits_config(alloc, quantized_acts=parse_width(table["widths"][0], "table")[1] is not None)
    info = {k: v for k, v in alloc.items() if k != "layers"}
    info.update(layers={n: f"w{w}a{a if a else 32}" for n, (w, a) in alloc["layers"].items()},
                sensitivity=auto.sensitivity or f"measured at {','.join(table['widths'])}",
                budget={"weight_bits_avg": auto.weight_bits_avg, "size_kb": auto.size_kb,
                        "act_bits_avg": auto.act_bits_avg})
    return bits, info


def _greedy_for_run(auto: AutoBitsConfig, folded, target: str, data, keep_float: tuple[str, ...],
                    quiet: bool, heldout=None) -> tuple[BitsConfig, dict]:
    """``--allocator greedy``: weight widths from the whole-model loss on (at most 256) calibration images;
    ``labels``: from the cross-entropy of the labelled ``heldout`` images. Every input at 8 bits."""
    from qexport.mixed.greedy import candidate_widths, greedy_allocation
    from qexport.quant.plan import build_plan

    if auto.allocator == "labels" and heldout is None:
        raise QexportError("--allocator labels measures the model on labelled images outside the calibration "
                           "subset: pass --data DIR with one subfolder per class")
    if data is None:
        raise QexportError(f"--bits auto --allocator {auto.allocator} measures the model on calibration images: "
                           "pass --data DIR")
    plan = build_plan(folded, target, BitsConfig(8, 8), tuple(keep_float))
    total = sum(int(folded.get_submodule(lp.name).weight.numel()) for lp in plan.layers)
    budget, _ = min(weight_budgets(auto.weight_bits_avg, auto.size_kb, total))
    widths = candidate_widths(budget / total, auto.floor)
    images, labels = heldout if auto.allocator == "labels" else (data[:256], None)
    res = greedy_allocation(folded, target, images, budget, widths=widths, keep_float=keep_float, labels=labels,
                            quiet=quiet)
    layers = {lp.name: (res["widths"][lp.name], 8 if lp.input_point else None) for lp in plan.layers}
    bits = sum(int(folded.get_submodule(n).weight.numel()) * w for n, (w, _) in layers.items())
    alloc = {"layers": layers}
    kind = "held-out labelled" if labels is not None else "calibration"
    info = {"allocator": auto.allocator, "measured_on": f"{len(images)} {kind} images",
            "candidate_widths": list(widths), "mean_weight_bits": bits / total,
            "weight_kb": bits / 8192, "mean_act_bits": 8.0, "measured_loss": res["loss"], "rounds": res["rounds"],
            "layers": {n: f"w{w}a{a if a else 32}" for n, (w, a) in layers.items()},
            "budget": {"weight_bits_avg": auto.weight_bits_avg, "size_kb": auto.size_kb, "act_bits_avg": None}}
    return bits_config(alloc), info
