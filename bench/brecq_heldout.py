"""Choosing brecq's and mixmix's defaults on held-out TRAINING images (never test-dev).

Calibrate ResNet-20/32 with ``brecq`` on the pipeline's seeded subset of ``--num-samples`` training images (or
data-free with ``--method mixmix``, which reads no real image), then measure the QuantSim on ``--eval-samples``
other training images: top-1 and agreement with FP32 top-1.

    python bench/brecq_heldout.py --bits w4a4 --opt iters=2000 --opt act_iters=1000
    python bench/brecq_heldout.py --bits w3a3 --first-last-bits 8 --opt time_budget=7m --opt drop_prob=0.5
    python bench/brecq_heldout.py --method mixmix --opt zoo=cifar:resnet32=R32.th --opt time_budget=15m
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_utils import cpu_seconds, heldout_split, method_options, predict

from qexport.calibrators.base import CalibrationContext, calibrate_activations, set_weight_scales
from qexport.calibrators.brecq import BrecqConfig, calibrate_brecq
from qexport.calibrators.mixmix import MixMixConfig, calibrate_mixmix
from qexport.models import fold_batchnorm
from qexport.quant.plan import build_plan
from qexport.quant.quantsim import QuantSim
from qexport.quant.spec import BitsConfig


METHODS = {"brecq": (BrecqConfig, calibrate_brecq), "mixmix": (MixMixConfig, calibrate_mixmix)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--num-samples", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--method", choices=tuple(METHODS), default="brecq")
    ap.add_argument("--opt", action="append", default=[], help="the method's option key=value (repeatable)")
    ap.add_argument("--first-last-bits", type=int, default=None, help="width of the first and last layer")
    ap.add_argument("--mse-only", action="store_true", help="measure the mse init only")
    ap.add_argument("--verbose", action="store_true", help="progress bars")
    args = ap.parse_args()
    split = heldout_split(args.depth, args.num_samples, args.seed, args.eval_samples)
    if split is None:
        return 0
    m, x_cal, x_ev, y_ev = split
    folded = fold_batchnorm(m.model).eval()
    ref = predict(folded, x_ev)
    bits = BitsConfig.parse(args.bits, args.first_last_bits)
    sim = QuantSim(folded, build_plan(folded, "onnxruntime", bits, ())).eval()
    config_cls, calibrate = METHODS[args.method]
    cfg = config_cls(**method_options(config_cls, args.opt, "bench --opt"))
    data = None if args.method == "mixmix" else x_cal
    t0 = time.time()
    if args.mse_only:
        set_weight_scales(sim, "mse")
        calibrate_activations(sim, x_cal, "mse", quiet=True)
        sim.snap_weights()
    else:
        torch.manual_seed(args.seed)
        calibrate(CalibrationContext(sim=sim, folded=folded, model=m, data=data, labels=None, seed=args.seed,
                                     quiet=not args.verbose), cfg)
    secs = time.time() - t0
    pred = predict(sim, x_ev)
    top1, agree = 100 * (pred == y_ev).float().mean().item(), 100 * (pred == ref).float().mean().item()
    fp = 100 * (ref == y_ev).float().mean().item()
    print(json.dumps({"method": args.method, "depth": args.depth, "bits": args.bits,
                      "first_last_bits": args.first_last_bits, "opts": args.opt, "mse_only": args.mse_only,
                      "fp32": round(fp, 2), "top1": round(top1, 2), "agree": round(agree, 2),
                      "seconds": round(secs, 1), "cpu_seconds": round(cpu_seconds(), 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
