"""AdaSG development curve: top-1 of the student (and of an EMA of its weights) on held-out TRAINING images
while the game runs. For choosing schedules and defaults without ever looking at test-dev: AdaSG is data-free,
so every training image is held out from it.

    python bench/adasg_heldout_curve.py --epochs 100 --every 10 --milestones ""     # constant student lr
    python bench/adasg_heldout_curve.py --bits w3a3 --epochs 200 --out curve.json

Prints one line per evaluation: epoch, training seconds (evaluation excluded), top-1 of the last student and
of the weight average, and the argmax agreement with the teacher on synthetic samples.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from bench_utils import top1 as top1_on


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--epochs", type=int, default=100, help="epochs of --iters-per-epoch iterations, warm-up included")
    ap.add_argument("--iters-per-epoch", type=int, default=50)
    ap.add_argument("--every", type=int, default=10, help="evaluate every N epochs")
    ap.add_argument("--lr-q", type=float, default=1e-4)
    ap.add_argument("--milestones", default="0.5,0.75", help="lr decay fractions ('' = constant lr)")
    ap.add_argument("--ema", type=float, default=0.999, help="decay of the weight average that is also evaluated")
    ap.add_argument("--heldout", type=int, default=1000, help="training images evaluated (seeded subset)")
    ap.add_argument("--act-init", default="ema", choices=["ema", "mse", "percentile"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the curve as JSON")
    args = ap.parse_args(argv)

    from qexport import shared
    from qexport.calibrators.adasg import AdaSGConfig, AdaSGTask
    from qexport.calibrators.base import CalibrationContext
    from qexport.training import Callbacks
    from qexport.data import load_tensor
    from qexport.models import fold_batchnorm, load_model
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.quant.spec import BitsConfig

    ckpt, train = shared.cifar_checkpoint(20), shared.cifar_images("train")
    if ckpt is None or train is None:
        print("skipped: shared folder with the ResNet-20 checkpoint and training images not found (QEXPORT_SHARED)")
        return 0
    torch.manual_seed(args.seed)
    m = load_model("cifar:resnet20", str(ckpt))
    x_ev, y_ev = load_tensor(train, m.preprocess, num_samples=args.heldout, seed=12345)

    def top1(model) -> float:
        return round(top1_on(model, x_ev, y_ev), 2)

    folded = fold_batchnorm(m.model)
    print(f"FP32 on {len(y_ev)} held-out training images: {top1(folded)}", flush=True)
    sim = QuantSim(folded, build_plan(folded, "onnxruntime", BitsConfig.parse(args.bits, None), ()))
    ms = tuple(float(v) for v in args.milestones.split(",")) if args.milestones else ()
    cfg = AdaSGConfig(epochs=args.epochs, iters_per_epoch=args.iters_per_epoch, lr_q=args.lr_q, milestones=ms,
                      act_init=args.act_init)
    curve: list[dict] = []
    average: dict[int, torch.Tensor] = {}

    def on_epoch(tr, row) -> None:
        if row["warmup"] or row["epoch"] % args.every:
            return
        last = top1(tr.sim)
        saved = [p.detach().clone() for p in tr.q_params]
        with torch.no_grad():
            for p in tr.q_params:
                p.copy_(average[id(p)])
            avg = top1(tr.sim)
            for p, v in zip(tr.q_params, saved):
                p.copy_(v)
        curve.append({"epoch": row["epoch"], "seconds": row["seconds"], "last": last, "weight_average": avg,
                      "agree_synthetic": row.get("agree")})
        print(curve[-1], flush=True)

    def on_step(tr, metrics: dict) -> None:  # an EMA of the student weights, beside the last ones
        with torch.no_grad():
            for p in tr.q_params:
                if not tr.acts_frozen or id(p) not in average:
                    average[id(p)] = p.detach().clone()
                else:
                    average[id(p)].mul_(args.ema).add_(p.detach(), alpha=1 - args.ema)

    def on_start(tr) -> None:
        print(f"start (after warm-up): {top1(tr.sim)}", flush=True)

    ctx = CalibrationContext(sim=sim, folded=folded, model=m, data=None, labels=None, seed=args.seed, device="cpu",
                             quiet=True, callbacks=Callbacks(on_epoch_end=on_epoch, on_warmup_end=on_start,
                                                             on_step_end=on_step))
    tr = AdaSGTask(ctx, cfg)
    tr.run()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "curve": curve}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
