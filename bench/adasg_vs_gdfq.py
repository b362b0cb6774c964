"""AdaSG vs its GDFQ baseline at equal budget and seed (issue 4), W4A4 and W3A3 on CIFAR-10 ResNet-20.

Every run is data-free (no real image is read for calibration); the test-dev images of the shared folder are only
used afterwards to measure top-1 of the final QuantSim, and at the end of each epoch for the top-1-against-time
curve (reported, never used to pick an epoch: the final student is the last one).

    python bench/adasg_vs_gdfq.py --budget 10m                       # 4 runs one after the other, CPU
    python bench/adasg_vs_gdfq.py --budget 6m --device cuda --parallel --out $OUT/bench.json
    python bench/adasg_vs_gdfq.py --budget 2h --bits w3a3 --loss adasg   # W3A3 top-1 against time up to 2 hours
    python bench/adasg_vs_gdfq.py --schedule paper --budget 8m --device cuda   # paper schedule, budgeted

Options that are not given take the calibrator's defaults (``--schedule budget``: 50 iterations per epoch,
2 warm-up epochs, student lr 1e-4; ``paper``: 200 iterations, 4 warm-up epochs, lr 1e-4). Prints one JSON line
per run and a table; ``--out`` also writes all results (with per-epoch curves) as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_utils import top1 as top1_on


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_one(bits: str, loss: str, args) -> dict:
    """One calibration run (in this process) with a per-epoch top-1 curve; returns the result dict."""
    from qexport import shared
    from qexport.calibrators.adasg import AdaSGConfig, AdaSGTask
    from qexport.calibrators.base import CalibrationContext
    from qexport.training import Callbacks
    from qexport.data import load_tensor
    from qexport.models import fold_batchnorm, load_model
    from qexport.calibrate import resolve_device
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.quant.spec import BitsConfig

    ckpt, dev = shared.cifar_checkpoint(20), shared.cifar_images("test-dev")
    if ckpt is None or dev is None:
        print("skipped: shared folder with the ResNet-20 checkpoint and test-dev images not found (QEXPORT_SHARED)")
        sys.exit(0)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    m = load_model("cifar:resnet20", str(ckpt))
    x_ev, y_ev = load_tensor(dev, m.preprocess, num_samples=args.eval_samples, seed=0)

    def top1(model) -> float:
        return round(top1_on(model, x_ev, y_ev, device=device), 2)

    folded = fold_batchnorm(m.model)
    fp32 = top1(folded.to(device))
    sim = QuantSim(folded, build_plan(folded, "onnxruntime", BitsConfig.parse(bits, None), ()))
    opts = {"schedule": args.schedule, "loss": loss, "time_budget": args.budget}
    for k in ("epochs", "iters_per_epoch", "lr_q", "warmup_epochs", "batch_size"):
        if getattr(args, k) is not None:
            opts[k] = getattr(args, k)
    cfg = AdaSGConfig(**opts)
    curve: list[dict] = []
    start: dict = {}

    def on_epoch(tr, row):
        if not row["warmup"]:
            curve.append({"epoch": row["epoch"], "seconds": row["seconds"], "top1": top1(tr.sim), "H": row.get("H"),
                          "BG": row.get("BG")})
            _log(f"{bits} {loss} epoch {row['epoch']}/{tr.loop.epochs} t {row['seconds']:.0f}s top1 {curve[-1]['top1']}")

    def on_start(tr):
        start["top1"] = top1(tr.sim)

    ctx = CalibrationContext(sim=sim, folded=folded, model=m, data=None, labels=None, seed=args.seed, device=device,
                             quiet=True, callbacks=Callbacks(on_epoch_end=on_epoch, on_warmup_end=on_start))
    tr = AdaSGTask(ctx, cfg)
    t0 = time.time()
    metrics = tr.run()
    final = top1(ctx.sim)
    return {"bits": bits, "loss": loss, "schedule": args.schedule, "budget": args.budget, "seed": args.seed,
            "device": device, "eval_samples": len(y_ev), "fp32": fp32, "start_top1": start.get("top1"),
            "final_top1": final, "drop": round(fp32 - final, 2), "wall_seconds": round(time.time() - t0, 1),
            "epochs_run": metrics["epochs_run"], "iterations": metrics["iterations"],
            "epoch_seconds": [r["seconds"] for r in tr.loop.history], "curve": curve}


def time_epoch(args) -> dict:
    """Seconds per paper-schedule epoch (200 iterations, batch 16), warm-up and training, from ``--time-iters``
    timed iterations after two untimed ones; extrapolated to the full paper schedule (4 + 396 epochs)."""
    from qexport import shared
    from qexport.calibrators.adasg import AdaSGConfig, AdaSGTask
    from qexport.calibrators.base import CalibrationContext, set_weight_scales
    from qexport.models import fold_batchnorm, load_model
    from qexport.calibrate import resolve_device
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.quant.spec import BitsConfig

    ckpt = shared.cifar_checkpoint(20)
    m = load_model("cifar:resnet20", str(ckpt) if ckpt else None)
    device = resolve_device(args.device)
    folded = fold_batchnorm(m.model)
    out = {"device": device, "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
    for bits in args.bits:
        sim = QuantSim(folded, build_plan(folded, "onnxruntime", BitsConfig.parse(bits, None), ()))
        ctx = CalibrationContext(sim=sim, folded=folded, model=m, data=None, labels=None, seed=0, device=device, quiet=True)
        tr = AdaSGTask(ctx, AdaSGConfig(schedule="paper"))
        set_weight_scales(tr.sim, "mse")
        res = {}
        for warm in (True, False):
            if not warm:
                tr.freeze_activation_ranges()
            for _ in range(2):
                tr.iteration(warm)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.time()
            for _ in range(args.time_iters):
                tr.iteration(warm)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            res["warmup" if warm else "train"] = (time.time() - t0) / args.time_iters
        ep_w, ep_t = res["warmup"] * 200, res["train"] * 200
        out[bits] = {"sec_per_iter_warmup": round(res["warmup"], 4), "sec_per_iter_train": round(res["train"], 4),
                     "sec_per_epoch_warmup": round(ep_w, 1), "sec_per_epoch_train": round(ep_t, 1),
                     "paper_schedule_hours": round((4 * ep_w + 396 * ep_t) / 3600, 2)}
        _log(f"{bits}: {out[bits]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", nargs="+", default=["w4a4", "w3a3"])
    ap.add_argument("--loss", nargs="+", default=["adasg", "gdfq"])
    ap.add_argument("--budget", default="10m", help="time budget per run (30m, 2h, ...)")
    ap.add_argument("--schedule", default="budget", choices=["budget", "paper"])
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--iters-per-epoch", type=int)
    ap.add_argument("--warmup-epochs", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr-q", type=float)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--parallel", action="store_true", help="one process per run, all at once (e.g. on a GPU)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--time-epoch", action="store_true", help="only time paper-schedule iterations (per epoch, total)")
    ap.add_argument("--time-iters", type=int, default=20)
    ap.add_argument("--one", nargs=2, metavar=("BITS", "LOSS"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.time_epoch:
        res = time_epoch(args)
        print("RESULT " + json.dumps(res))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1))
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one[0], args.one[1], args)), flush=True)
        return
    combos = [(b, l) for b in args.bits for l in args.loss]
    results = []
    if args.parallel:
        base = [a for a in sys.argv[1:] if a != "--parallel"]
        procs = [subprocess.Popen([sys.executable, __file__, *base, "--one", b, l], stdout=subprocess.PIPE, text=True)
                 for b, l in combos]
        for p in procs:
            for line in p.stdout:
                if line.startswith("RESULT "):
                    results.append(json.loads(line[7:]))
                else:
                    print(line, end="", flush=True)
            p.wait()
    else:
        for b, l in combos:
            _log(f"run {b} {l} budget {args.budget}")
            results.append(run_one(b, l, args))
            print("RESULT " + json.dumps(results[-1]), flush=True)
    print(f"\n{'bits':6} {'loss':6} {'fp32':>6} {'start':>6} {'final':>6} {'drop':>6} {'epochs':>6} {'iters':>6} {'wall s':>7}")
    for r in results:
        print(f"{r['bits']:6} {r['loss']:6} {r['fp32']:6.2f} {r['start_top1'] or 0:6.2f} {r['final_top1']:6.2f} "
              f"{r['drop']:6.2f} {r['epochs_run']:6d} {r['iterations']:6d} {r['wall_seconds']:7.0f}")
    for b in args.bits:
        by = {r["loss"]: r for r in results if r["bits"] == b}
        if "adasg" in by and "gdfq" in by:
            d = by["adasg"]["final_top1"] - by["gdfq"]["final_top1"]
            print(f"{b}: AdaSG {'beats' if d > 0 else 'does NOT beat'} GDFQ by {d:+.2f} points")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
