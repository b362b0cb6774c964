"""Choosing brecq's defaults on held-out TRAINING images (never test-dev).

Calibrate ResNet-20/32 with ``brecq`` on the pipeline's seeded subset of ``--num-samples`` training images, then
measure the QuantSim on ``--eval-samples`` other training images: top-1 and agreement with FP32 top-1.

    python bench/brecq_heldout.py --bits w4a4 --opt iters=2000 --opt act_iters=1000
"""

from __future__ import annotations

import argparse
import resource
import json
import time

import torch
from bench_utils import predict

from qexport.calibrators.base import CalibrationContext, calibrate_activations, set_weight_scales
from qexport.calibrators.brecq import BrecqConfig, calibrate_brecq
from qexport.data import ImageFolder, load_tensor
from qexport.data.folder import subset_indices
from qexport.models import fold_batchnorm, load_model
from qexport.quant.plan import build_plan
from qexport.quant.quantsim import QuantSim
from qexport.quant.spec import BitsConfig
from qexport.shared import cifar_checkpoint, cifar_images


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def cpu_seconds() -> float:
    """CPU time this process has used (user + system): what the run costs on an idle machine, whatever the load."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--num-samples", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--opt", action="append", default=[], help="brecq option key=value (repeatable)")
    ap.add_argument("--mse-only", action="store_true", help="measure the mse init only")
    ap.add_argument("--verbose", action="store_true", help="progress bars")
    args = ap.parse_args()
    ckpt, train = cifar_checkpoint(args.depth), cifar_images("train")
    if ckpt is None or train is None:
        print("shared folder with the checkpoint and training images not found (QEXPORT_SHARED); nothing to measure")
        return 0
    m = load_model(f"cifar:resnet{args.depth}", str(ckpt))
    folder = ImageFolder(train, m.preprocess)
    calib_idx = set(subset_indices(len(folder), args.num_samples, args.seed))
    x_cal, _ = load_tensor(folder, num_samples=args.num_samples, seed=args.seed)
    rest = [i for i in range(len(folder)) if i not in calib_idx]
    pick = torch.randperm(len(rest), generator=torch.Generator().manual_seed(12345))[: args.eval_samples]
    xs, ys = zip(*(folder[rest[int(i)]] for i in pick))
    x_ev, y_ev = torch.stack(xs), torch.tensor(ys)
    folded = fold_batchnorm(m.model).eval()
    ref = predict(folded, x_ev)
    sim = QuantSim(folded, build_plan(folded, "onnxruntime", BitsConfig.parse(args.bits, None), ())).eval()
    opts = dict(o.split("=", 1) for o in args.opt)
    cfg = BrecqConfig(**{k: _value(v) for k, v in opts.items()})
    t0 = time.time()
    if args.mse_only:
        set_weight_scales(sim, "mse")
        calibrate_activations(sim, x_cal, "mse", quiet=True)
        sim.snap_weights()
    else:
        torch.manual_seed(args.seed)
        calibrate_brecq(CalibrationContext(sim=sim, folded=folded, model=m, data=x_cal, labels=None, seed=args.seed,
                                           quiet=not args.verbose), cfg)
    secs = time.time() - t0
    pred = predict(sim, x_ev)
    top1, agree = 100 * (pred == y_ev).float().mean().item(), 100 * (pred == ref).float().mean().item()
    fp = 100 * (ref == y_ev).float().mean().item()
    print(json.dumps({"depth": args.depth, "bits": args.bits, "opts": opts, "mse_only": args.mse_only,
                      "fp32": round(fp, 2), "top1": round(top1, 2), "agree": round(agree, 2),
                      "seconds": round(secs, 1), "cpu_seconds": round(cpu_seconds(), 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
