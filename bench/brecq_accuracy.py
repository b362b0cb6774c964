"""Acceptance figures of brecq / mixmix on the CIFAR ResNets: calibrate -> QDQ ONNX -> ONNX Runtime engine -> verify
on all of test-dev. Prints FP32 / QuantSim / engine top-1, the drop, engine-vs-QuantSim agreement and the
calibration seconds (the machine may be shared: say so with the figures).

    python bench/brecq_accuracy.py --bits w4a4 --opt time_budget=14m                    # brecq, 1,024 real images
    python bench/brecq_accuracy.py --bits w2a4 --first-last-bits 8                      # first conv and fc at 8 bits
    python bench/brecq_accuracy.py --method mixmix --bits w4a4 --opt time_budget=30m \\
        --opt zoo=cifar:resnet32=../shared/models/cifar10/resnet32-d509ac18.th           # data-free
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench_utils import cpu_seconds, method_options

from qexport.build_engine import build_engine_folder
from qexport.calibrate import CalibrateConfig, calibrate
from qexport.calibrators import get_calibrator
from qexport.export.qdq import export_recipe
from qexport.shared import cifar_checkpoint, cifar_images
from qexport.verify.compare import VerifyConfig, verify



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--method", default="brecq")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--num-samples", type=int, default=1024, help="calibration images (brecq)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opt", action="append", default=[], help="method option key=value (repeatable)")
    ap.add_argument("--first-last-bits", type=int, default=None, help="width of the first and last layer")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folder here")
    args = ap.parse_args(argv)
    train, test, ckpt = cifar_images("train"), cifar_images("test-dev"), cifar_checkpoint(args.depth)
    if train is None or test is None or ckpt is None:
        print("shared folder with CIFAR-10 images and checkpoints not found (set QEXPORT_SHARED); nothing to measure")
        return 0
    opts = method_options(get_calibrator(args.method).config, args.opt, f"--method {args.method}")
    with tempfile.TemporaryDirectory() as tmp:
        run = args.keep or Path(tmp) / "run"
        t0, c0 = time.time(), cpu_seconds()
        data = str(train) if args.method != "mixmix" else None
        recipe = calibrate(CalibrateConfig(model=f"cifar:resnet{args.depth}", weights=str(ckpt),
                                           output=run / "recipe", method=args.method, bits=args.bits, data=data,
                                           num_samples=args.num_samples, seed=args.seed, options=opts, quiet=True,
                                           first_last_bits=args.first_last_bits))
        secs, cpu = time.time() - t0, cpu_seconds() - c0
        qdq, _, _ = export_recipe(recipe, "onnxruntime", run / "model.onnx")
        engine = build_engine_folder(qdq, run / "engine", "onnxruntime")
        rep, _ = verify(VerifyConfig(engine=engine, recipe=recipe, data=test, report=run / "report",
                                     bench_batch_sizes=(), quiet=True))
        a = rep["accuracy"]
        print(json.dumps({"model": f"resnet{args.depth}", "method": args.method, "bits": args.bits,
                          "seed": args.seed, "first_last_bits": args.first_last_bits, "opts": {k: str(v) for k, v in opts.items()},
                          "fp32": round(100 * a["fp32_top1"], 2), "quantsim": round(100 * a["quantsim_top1"], 2),
                          "engine": round(100 * a["engine_top1"], 2), "drop": round(a["top1_drop_points"], 2),
                          "agreement": round(100 * a["engine_vs_quantsim_agreement"], 2),
                          "images": a.get("num_images", a.get("images")), "calibration_s": round(secs),
                          "calibration_cpu_s": round(cpu)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
