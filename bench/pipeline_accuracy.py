"""Accuracy and parity of the whole pipeline on the real CIFAR-10 ResNets (issue: end-to-end pipeline).

For each model x (method, bits): calibrate on training images, export for a target, build the engine and
verify on test-dev. Prints FP32 / QuantSim / engine top-1, the drop and engine-vs-QuantSim agreement.

    python bench/pipeline_accuracy.py                      # ResNet-20 and -32, the issue's configurations
    python bench/pipeline_accuracy.py --models 20 --configs mse:w8a8 --target openvino
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from qexport.build_engine import build_engine_folder
from qexport.export.qdq import export_recipe
from qexport.calibrate import CalibrateConfig, calibrate
from qexport.shared import cifar_checkpoint, cifar_images
from qexport.verify.compare import VerifyConfig, verify

DEFAULT_CONFIGS = ("minmax:w8a8", "percentile:w8a8", "mse:w8a8", "mse:w4a8", "mse:w4a4")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="20,32", help="CIFAR ResNet depths")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="method:bits list")
    ap.add_argument("--target", default="onnxruntime")
    ap.add_argument("--num-samples", type=int, default=512, help="calibration images")
    ap.add_argument("--eval-samples", type=int, default=None, help="test-dev subset (default all 5,000)")
    args = ap.parse_args(argv)
    train, test = cifar_images("train"), cifar_images("test-dev")
    if train is None or test is None:
        print("shared folder with CIFAR-10 images not found (set QEXPORT_SHARED); nothing to measure")
        return 0
    print(f"{'model':<10} {'config':<16} {'fp32':>6} {'sim':>6} {'engine':>6} {'drop':>6} {'agree %':>8} {'s':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        for depth in (int(d) for d in args.models.split(",")):
            ckpt = cifar_checkpoint(depth)
            if ckpt is None:
                print(f"resnet{depth}: no checkpoint in the shared folder, skipped")
                continue
            for conf in args.configs.split(","):
                method, bits = conf.split(":")
                t0 = time.time()
                run = Path(tmp) / f"r{depth}-{method}-{bits}"
                recipe = calibrate(CalibrateConfig(model=f"cifar:resnet{depth}", weights=str(ckpt), output=run / "recipe",
                                                   method=method, bits=bits, target=args.target, data=str(train),
                                                   num_samples=args.num_samples, quiet=True))
                qdq, _, _ = export_recipe(recipe, args.target, run / "model.onnx")
                engine = build_engine_folder(qdq, run / "engine", args.target)
                rep, _ = verify(VerifyConfig(engine=engine, recipe=recipe, data=test, report=run / "report",
                                             num_samples=args.eval_samples, bench_batch_sizes=(), quiet=True))
                a = rep["accuracy"]
                print(f"resnet{depth:<4} {conf:<16} {100 * a['fp32_top1']:6.2f} {100 * a['quantsim_top1']:6.2f} "
                      f"{100 * a['engine_top1']:6.2f} {a['top1_drop_points']:6.2f} "
                      f"{100 * a['engine_vs_quantsim_agreement']:8.2f} {time.time() - t0:5.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
