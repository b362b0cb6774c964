"""Mixed precision on CIFAR-10 ResNet-20 (mse calibration, activations 8 bits): sensitivity-based per-layer
weight widths vs uniform W4A8 vs random per-layer allocations at the same mean width, in one run.

    python bench/mixed_precision.py                       # budgets 4.0 and 4.5, 5 random seeds at 4.5, all test-dev
    python bench/mixed_precision.py --eval-samples 1000 --random-seeds 2

Steps: one sensitivity table (``qexport sensitivity`` at the default probe widths w3a4,w4a4,w6a6 on 128
calibration images: only its weight column is used here); for each budget ``--bits auto --weight-bits-avg B``
(knapsack) and random allocations with the same candidate widths {3, 4, 6, 8} filling the same budget; uniform
W4A8 and W5A8 as references. Every recipe: mse, 512 training images, seed 0. Top-1 of QuantSim on test-dev
(final figures only; nothing is chosen on it); the auto recipe at the largest budget also goes through an ONNX
Runtime engine (engine vs QuantSim agreement).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from qexport.data import load_tensor
from qexport.mixed.allocate import AutoBitsConfig
from qexport.mixed.sensitivity_run import SensitivityConfig, load_table, run_sensitivity
from qexport.models import load_model
from qexport.calibrate import CalibrateConfig, calibrate
from qexport.quant.layer_bits import mean_weight_bits
from qexport.recipe import QuantRecipe
from qexport.shared import cifar_checkpoint, cifar_images

CANDIDATES = (3, 4, 6, 8)


def random_allocation(numels: dict[str, int], budget: float, seed: int) -> dict[str, int]:
    """Random per-layer widths from CANDIDATES with mean weight bits <= budget, filled up to the budget.

    Args:
        numels: layer -> weight count.
        budget: mean weight bits.
        seed: RNG seed.

    Returns:
        layer -> weight bits.
    """
    rng = random.Random(seed)
    total = sum(numels.values())
    widths = {n: CANDIDATES[0] for n in numels}
    spent = sum(numels[n] * b for n, b in widths.items())
    for _ in range(2000):
        n = rng.choice(sorted(numels))
        b = rng.choice([c for c in CANDIDATES if c > widths[n]] or [widths[n]])
        extra = numels[n] * (b - widths[n])
        if extra > 0 and spent + extra <= budget * total:
            widths[n], spent = b, spent + extra
    return widths


def top1(recipe_dir: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    sim = QuantRecipe.load(recipe_dir).build_quantsim()
    with torch.no_grad():
        pred = torch.cat([sim(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return 100.0 * float((pred == y).double().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="4.0,4.5", help="mean weight bits budgets")
    ap.add_argument("--random-seeds", type=int, default=5, help="random allocations at the largest budget")
    ap.add_argument("--sens-samples", type=int, default=128, help="calibration images of the sensitivity table")
    ap.add_argument("--eval-samples", type=int, default=None, help="test-dev subset (default all 5,000)")
    ap.add_argument("--num-samples", type=int, default=512)
    args = ap.parse_args(argv)
    train, test, ckpt = cifar_images("train"), cifar_images("test-dev"), cifar_checkpoint(20)
    if train is None or test is None or ckpt is None:
        print("shared folder with CIFAR-10 images / ResNet-20 checkpoint not found; nothing to measure")
        return 0
    pre = load_model("cifar:resnet20").preprocess
    x, y = load_tensor(test, pre, num_samples=args.eval_samples, seed=0)
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = dict(model="cifar:resnet20", weights=str(ckpt), method="mse", data=str(train),
                    num_samples=args.num_samples, seed=0, quiet=True)
        t0 = time.time()
        run_sensitivity(SensitivityConfig(model="cifar:resnet20", output=tmp / "sens", data=str(train),
                                          bits="w3a4,w4a4,w6a6", weights=str(ckpt), num_samples=args.sens_samples,
                                          quiet=True))
        print(f"sensitivity table: {time.time() - t0:.0f} s wall; most sensitive (w3 weights): "
              + ", ".join(r["layer"] for r in sorted(load_table(tmp / "sens")["layers"],
                                                     key=lambda r: -r["loss"]["w3a4"]["weight"])[:4]))
        rows = []

        def run(name: str, **kw) -> None:
            t = time.time()
            out = calibrate(CalibrateConfig(output=tmp / name, **base, **kw))
            rec = QuantRecipe.load(out)
            numels = {n: int(v.numel()) for n, v in rec.int_weights.items()}
            acc = top1(out, x, y)
            rows.append((name, mean_weight_bits(rec.plan, numels), acc))
            print(f"{name:<22} mean weight bits {rows[-1][1]:.3f}  top-1 {acc:.2f}  ({time.time() - t:.0f} s)",
                  flush=True)

        run("uniform w4a8", bits="w4a8")
        run("uniform w5a8", bits="w5a8")
        numels = {r["layer"]: r["weights"] for r in load_table(tmp / "sens")["layers"]}
        budgets = [float(b) for b in args.budgets.split(",")]
        for b in budgets:
            run(f"sensitivity avg {b:g}", bits="auto",
                auto_bits=AutoBitsConfig(weight_bits_avg=b, sensitivity=str(tmp / "sens")))
            accs = []
            for s in range(args.random_seeds if b == budgets[-1] else 0):
                widths = random_allocation(numels, b, s)
                run(f"random avg {b:g} seed {s}", bits="w8a8",
                    layer_bits=tuple(f"{n}={'w%da8' % w}" for n, w in sorted(widths.items())))
                accs.append(rows[-1][2])
            if accs:
                print(f"random avg {b:g}: mean top-1 {sum(accs) / len(accs):.2f} over {len(accs)} seeds", flush=True)
        _engine_check(tmp / f"sensitivity avg {budgets[-1]:g}", test, args.eval_samples)
    print(f"total {time.time() - t_start:.0f} s wall (shared machine: wall times are noisy)")
    return 0


def _engine_check(recipe: Path, test: Path, eval_samples: int | None) -> None:
    from qexport.build_engine import build_engine_folder
    from qexport.export.qdq import export_recipe
    from qexport.verify.compare import VerifyConfig, verify

    qdq, _, _ = export_recipe(recipe, "onnxruntime", recipe.parent / "mixed.onnx")
    eng = build_engine_folder(qdq, recipe.parent / "mixed_engine", "onnxruntime", threads=1)
    rep, _ = verify(VerifyConfig(engine=eng, recipe=recipe, data=test, num_samples=eval_samples,
                                 bench_batch_sizes=(), quiet=True))
    a = rep["accuracy"]
    print(f"engine (onnxruntime) of '{recipe.name}': top-1 {100 * a['engine_top1']:.2f}, QuantSim "
          f"{100 * a['quantsim_top1']:.2f}, agreement {100 * a['engine_vs_quantsim_agreement']:.2f} %, "
          f"FP32 {100 * a['fp32_top1']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
