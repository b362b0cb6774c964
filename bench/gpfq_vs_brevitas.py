"""qexport GPFQ vs Brevitas gpfq_mode on a CIFAR ResNet from the shared folder, in one run.

Same BN-folded model, same calibration images (seeded subset of train), same bit widths, per-channel weight
grids, weights only; top-1 on test-dev (QuantSim for qexport, the Brevitas model for Brevitas).

    pip install -e '.[bench]'      # brevitas is a benchmark-only dependency
    python bench/gpfq_vs_brevitas.py --depth 20 --bits 4 3 --num-samples 1000 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
from bench_utils import top1


def run_qexport(folded, lm, xc: torch.Tensor, bits: int, c: str) -> tuple[nn.Module, float, dict]:
    from qexport.calibrators.base import CalibrationContext
    from qexport.calibrators.gpfq import GPFQConfig, calibrate_gpfq
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.quant.spec import BitsConfig

    sim = QuantSim(folded, build_plan(folded, "onnxruntime", BitsConfig.parse(f"w{bits}", None)))
    ctx = CalibrationContext(sim=sim, folded=folded, model=lm, data=xc, labels=None, quiet=True)
    t, cpu = time.perf_counter(), time.process_time()
    metrics = calibrate_gpfq(ctx, GPFQConfig(c=c))
    metrics["cpu_seconds"] = time.process_time() - cpu
    return sim.eval(), time.perf_counter() - t, metrics


def brevitas_model(folded: nn.Module, bits: int) -> nn.Module:
    """The folded model with every Conv2d/Linear replaced by a Brevitas layer (per-channel int weights)."""
    import copy

    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerChannelFloat

    model = copy.deepcopy(folded)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Conv2d):
            q = qnn.QuantConv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                                mod.dilation, mod.groups, bias=mod.bias is not None,
                                weight_quant=Int8WeightPerChannelFloat, weight_bit_width=bits)
        elif isinstance(mod, nn.Linear):
            q = qnn.QuantLinear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                weight_quant=Int8WeightPerChannelFloat, weight_bit_width=bits)
        else:
            continue
        q.load_state_dict(mod.state_dict(), strict=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, q)
    return model.eval()


def run_brevitas(folded, xc: torch.Tensor, bits: int, batch_size: int) -> tuple[nn.Module, float]:
    from brevitas.graph.gpfq import gpfq_mode

    model = brevitas_model(folded, bits)
    t, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad(), gpfq_mode(model, use_quant_activations=False) as gpfq:
        gmodel = gpfq.model
        for _ in range(gpfq.num_layers):
            for i in range(0, len(xc), batch_size):
                gmodel(xc[i : i + batch_size])
            gpfq.update()
    return model.eval(), time.perf_counter() - t, time.process_time() - cpu


def time_only(args) -> None:
    from qexport.models import fold_batchnorm, load_model

    lm = load_model(args.time_only, input_size=args.input_size)
    folded = fold_batchnorm(lm.model).eval()
    gen = torch.Generator().manual_seed(0)
    xc = torch.randn(args.num_samples, 3, args.input_size, args.input_size, generator=gen)
    for b in args.bits:
        _, t, m = run_qexport(folded, lm, xc, b, args.c)
        print(f"{args.time_only} {args.input_size}x{args.input_size}, {len(xc)} images, W{b} GPFQ (c={args.c}): "
              f"{t:.1f} s wall, {m['cpu_seconds']:.1f} s CPU, {len(m['layers'])} layers, mean rel err {m['mean_rel_error']:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--eval-samples", type=int, default=None, help="test-dev subset (default: all)")
    ap.add_argument("--c", default="auto", help="qexport --c")
    ap.add_argument("--batch-size", type=int, default=100, help="Brevitas calibration batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-brevitas", action="store_true")
    ap.add_argument("--time-only", metavar="MODEL", default=None,
                    help="instead: time qexport GPFQ (W4, --c) on MODEL (e.g. torchvision:resnet18) with random "
                         "weights and --num-samples random images of --input-size")
    ap.add_argument("--input-size", type=int, default=224)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.time_only:
        time_only(args)
        return

    from qexport import shared
    from qexport.data import ImageFolder, load_tensor
    from qexport.models import fold_batchnorm, load_model

    ckpt, train, test = (shared.cifar_checkpoint(args.depth), shared.cifar_images("train"),
                         shared.cifar_images("test-dev"))
    if ckpt is None or train is None or test is None:
        raise SystemExit("shared folder with CIFAR checkpoints/images not found (set QEXPORT_SHARED)")
    lm = load_model(f"cifar:resnet{args.depth}", str(ckpt))
    folded = fold_batchnorm(lm.model).eval()
    xc, _ = load_tensor(ImageFolder(train, lm.preprocess), num_samples=args.num_samples, seed=0)
    xt, yt = load_tensor(ImageFolder(test, lm.preprocess), num_samples=args.eval_samples, seed=0)
    fp = top1(folded, xt, yt)
    print(f"resnet{args.depth}: {len(xc)} calibration images, {len(xt)} test-dev images, {args.threads} threads, "
          f"FP32 top-1 {fp:.2f}", flush=True)
    print(f"{'bits':>4} {'qexport top1':>12} {'time s':>7} {'brevitas top1':>13} {'time s':>7} {'speed-up':>8}")
    for b in args.bits:
        sim, t_q, mq = run_qexport(folded, lm, xc, b, args.c)
        acc_q = top1(sim, xt, yt)
        print(f"  qexport W{b}: top-1 {acc_q:.2f}, {t_q:.1f} s wall, {mq['cpu_seconds']:.1f} s CPU", flush=True)
        if args.skip_brevitas:
            print(f"{b:>4} {acc_q:>12.2f} {t_q:>7.1f}", flush=True)
            continue
        bmodel, t_b, cpu_b = run_brevitas(folded, xc, b, args.batch_size)
        acc_b = top1(bmodel, xt, yt)
        print(f"  brevitas W{b}: top-1 {acc_b:.2f}, {t_b:.1f} s wall, {cpu_b:.1f} s CPU "
              f"(CPU-time ratio {cpu_b / mq['cpu_seconds']:.1f}x)", flush=True)
        print(f"{b:>4} {acc_q:>12.2f} {t_q:>7.1f} {acc_b:>13.2f} {t_b:>7.1f} {t_b / t_q:>7.1f}x", flush=True)


if __name__ == "__main__":
    main()
