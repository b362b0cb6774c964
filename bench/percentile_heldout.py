"""Activation-clipping choices of the ``percentile`` calibrator, judged on held-out TRAINING images.

This is how the default percentile (99.999) was chosen; figures in bench/README.md.

The selection data are training images that the calibration subset did not use (never test-dev): calibrate on
``--num-samples`` training images (the pipeline's seeded subset), then measure the QuantSim on up to
``--eval-samples`` of the other training images. Two figures per variant: top-1, and agreement with the FP32
model's top-1 (label-free and less noisy than top-1, since most images are right or wrong in both).

    python bench/percentile_heldout.py --depth 32                 # percentiles, and the input point at min-max
    python bench/percentile_heldout.py --depth 32 --per-point     # also: each point alone back at min-max
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_utils import heldout_split, predict

from qexport.calibrators.base import calibrate_activations, set_weight_scales
from qexport.calibrators.baseline import PercentileConfig
from qexport.models import fold_batchnorm
from qexport.quant.plan import build_plan
from qexport.quant.quantsim import QuantSim
from qexport.quant.spec import BitsConfig


def act_scales(sim: QuantSim) -> dict[str, float]:
    """The current per-tensor activation scales, by point name."""
    return {name: float(aq.scale) for name, aq in sim.act_quantizers().items()}


def set_act_scales(sim: QuantSim, scales: dict[str, float]) -> None:
    """Set activation scales (then re-apply the plan's shared scales)."""
    with torch.no_grad():
        for name, aq in sim.act_quantizers().items():
            aq.scale.fill_(scales[name])
    sim.apply_shared_scales()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--bits", default="w8a8")
    ap.add_argument("--num-samples", type=int, default=512, help="calibration images (as the pipeline bench)")
    ap.add_argument("--seed", type=int, default=0, help="calibration subset seed (as the pipeline's --seed)")
    ap.add_argument("--eval-samples", type=int, default=5000, help="held-out training images to measure on")
    ap.add_argument("--percentiles", default="99.9,99.99,99.999,99.9999")
    ap.add_argument("--per-point", action="store_true",
                    help="each point alone at min-max (the others at the default percentile)")
    args = ap.parse_args()
    split = heldout_split(args.depth, args.num_samples, args.seed, args.eval_samples)
    if split is None:
        return 0
    m, x_cal, x_ev, y_ev = split

    folded = fold_batchnorm(m.model).eval()
    ref = predict(folded, x_ev)
    print(f"resnet{args.depth} {args.bits}: {len(y_ev)} held-out training images, FP32 top-1 "
          f"{100 * (ref == y_ev).float().mean():.2f}")
    sim = QuantSim(folded, build_plan(folded, "onnxruntime", BitsConfig.parse(args.bits, None), ())).eval()
    set_weight_scales(sim, "minmax")
    sim.snap_weights()

    def measure(label: str) -> None:
        t0 = time.time()
        pred = predict(sim, x_ev)
        top1, agree = 100 * (pred == y_ev).float().mean().item(), 100 * (pred == ref).float().mean().item()
        print(f"  {label:<44} top-1 {top1:6.2f}  agrees with FP32 {agree:6.2f} %  ({time.time() - t0:.0f} s)",
              flush=True)

    calibrate_activations(sim, x_cal, "minmax", quiet=True, seed=args.seed)
    minmax = act_scales(sim)
    measure("minmax (every point at its observed range)")
    by_pct = {}
    for p in (float(s) for s in args.percentiles.split(",")):
        calibrate_activations(sim, x_cal, "percentile", percentile=p, quiet=True, seed=args.seed)
        by_pct[p] = act_scales(sim)
        measure(f"percentile {p}")
    default = PercentileConfig().percentile
    base = by_pct.get(default) or next(iter(by_pct.values()))
    graph_inputs = {n.name for n in sim.gm.graph.nodes if n.op == "placeholder"}
    inputs = [n for n in minmax if n in graph_inputs]  # the point on the network input, if it is quantized
    print("  points: " + ", ".join(f"{n} {base[n] / minmax[n]:.2f}" for n in minmax) + "  (percentile/minmax scale)")
    if inputs:
        set_act_scales(sim, {**base, **{n: minmax[n] for n in inputs}})
        measure(f"{default}, network input {inputs[0]} at min-max")
    if args.per_point:
        for n in minmax:
            if abs(base[n] - minmax[n]) > 1e-12 * minmax[n]:
                set_act_scales(sim, {**base, n: minmax[n]})
                measure(f"{default}, {n} at min-max")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
