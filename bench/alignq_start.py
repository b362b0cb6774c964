"""Where AlignQ training starts: held-out top-1 of ResNet-20 W4A4 right after each alignment, before any step.

    python bench/alignq_start.py [--images 3000]

AlignQ deploys a different network from the float one (docs/alignq.md): CDF-aligned weights (integers
``round(n * erf(z / sqrt 2))`` of the standardised weights, a least-squares per-channel scale) and Erf-aligned
activations. This measures what each alignment costs the pretrained network before training, against the plan's
uniform quantizers (``ste``'s start: mse weight scales, percentile activation scales), on the trainer's own
held-out share of a seeded subset of the shared training images (never test-dev). First and last layer 8-bit.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("QEXPORT_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "models/cifar10/resnet20-12fca82f.th"
TRAIN = SHARED / "data/cifar10/train"
VARIANTS = {"uniform (ste)": None, "weights aligned": {"align": "weights"},
            "activations aligned": {"align": "activations"}, "both aligned (alignq)": {}}


def start_top1(options: dict | None, images: int) -> float:
    """Held-out top-1 (%) of the QAT trainer's network before its first step."""
    from qexport.calibrators.alignq import AlignQConfig, AlignQMethod, aligned_quantsim
    from qexport.calibrators.base import CalibrationContext
    from qexport.calibrators.qat import QATConfig
    from qexport.calibrators.qat_task import QATTask
    from qexport.calibrators.ste import SteMethod
    from qexport.models import fold_batchnorm, load_model
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.quant.spec import BitsConfig

    loaded = load_model("cifar:resnet20", str(WEIGHTS))
    folded = fold_batchnorm(loaded.model)
    sim = QuantSim(folded, build_plan(folded, "onnxruntime", BitsConfig.parse("w4a4", 8)))
    ctx = CalibrationContext(sim=sim, folded=folded, model=loaded, data=None, labels=None, seed=0, quiet=True,
                             data_dir=TRAIN)
    common = {"max_images": images, "val_fraction": 0.34}
    if options is None:
        task = QATTask(ctx, QATConfig(**common), SteMethod())
    else:
        cfg = AlignQConfig(**common, admm=False, **options)
        ctx.sim, points = aligned_quantsim(ctx, cfg)
        task = QATTask(ctx, cfg, AlignQMethod(cfg, points))
    return task.evaluate()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000, help="seeded subset of the training images (a third held out)")
    args = ap.parse_args()
    if not WEIGHTS.is_file() or not TRAIN.is_dir():
        print(f"needs the shared ResNet-20 checkpoint and images under {SHARED}", file=sys.stderr)
        return 2
    print("| network at step 0 (W4A4, first/last 8-bit) | held-out top-1 |\n|---|---|")
    for name, options in VARIANTS.items():
        print(f"| {name} | {start_top1(options, args.images):.2f} % |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
