"""Mixed precision on CIFAR-10 ResNet-20 (mse calibration, activations 8 bits): sensitivity-based per-layer
weight widths vs uniform W4A8 vs random per-layer allocations at the same mean width, in one run.

    python bench/mixed_precision.py                       # budget 4.5, 5 random seeds, all test-dev
    python bench/mixed_precision.py --eval-samples 1000 --random-seeds 2 --table runs/sens20

Steps: the greedy allocations (``--bits auto --allocator greedy``: whole-model KL against the float model on
calibration images; ``--allocator labels``: whole-model cross-entropy on the 1,000 labelled training images right
after the calibration subset; widths 4, 5, 6, 8; and once at the size of uniform W4A8, mean 4.0, with 3-bit
layers allowed); one
sensitivity table (``qexport sensitivity`` at the default probe widths w3a4,w4a4,w6a6 on 128
calibration images: only its weight column is used here); for each budget ``--bits auto --weight-bits-avg B``
(knapsack; by default no layer below the floor of the mean, and once without that rule) and random allocations
from the same widths {4, 6, 8} filling the same budget; uniform W4A8 as the reference. Every recipe: mse, 512
training images, seed 0 (`--seed`). Top-1 of QuantSim on held-out training images (outside the calibration
subset and the label allocator's images: where choices are made) and on test-dev (final figures); one auto
recipe also goes through an ONNX Runtime engine (engine vs QuantSim agreement).
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

CANDIDATES = (4, 6, 8)  # the widths the sensitivity-based allocation may use at a 4.5 budget (floor 4)


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


def heldout_training(train: Path, pre, num_calib: int, count: int, skip: int, seed: int = 0):
    """``count`` training images outside the calibration subset and the ``skip`` images after it (the label
    allocator's), from the same seeded permutation."""
    from qexport.data import ImageFolder
    from qexport.mixed.sensitivity_run import load_heldout

    x, y = load_heldout(ImageFolder(train, pre), num_calib, seed, skip + count, quiet=True)
    return x[skip:], y[skip:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=4.5, help="mean weight bits budget")
    ap.add_argument("--random-seeds", type=int, default=5, help="random allocations at the budget")
    ap.add_argument("--sens-samples", type=int, default=128, help="calibration images of the sensitivity table")
    ap.add_argument("--table", default=None, help="sensitivity folder to reuse (written there when missing)")
    ap.add_argument("--heldout", type=int, default=2000, help="held-out training images (choices)")
    ap.add_argument("--label-images", type=int, default=1000, help="images the label allocator measures on")
    ap.add_argument("--eval-samples", type=int, default=None, help="test-dev subset (default all 5,000)")
    ap.add_argument("--num-samples", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0, help="calibration subset (so also the held-out images)")
    ap.add_argument("--skip-below-floor", action="store_true", help="leave out the knapsack without the floor rule")
    ap.add_argument("--engine-recipe", default="labels", choices=("labels", "greedy", "sensitivity"),
                    help="the allocation also run through an ONNX Runtime engine")
    args = ap.parse_args(argv)
    train, test, ckpt = cifar_images("train"), cifar_images("test-dev"), cifar_checkpoint(20)
    if train is None or test is None or ckpt is None:
        print("shared folder with CIFAR-10 images / ResNet-20 checkpoint not found; nothing to measure")
        return 0
    pre = load_model("cifar:resnet20").preprocess
    sets = {"held-out train": heldout_training(train, pre, args.num_samples, args.heldout, args.label_images,
                                                 args.seed),
            "test-dev": load_tensor(test, pre, num_samples=args.eval_samples, seed=0)}
    print("images: " + ", ".join(f"{k} {len(v[1])}" for k, v in sets.items()), flush=True)
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sens = Path(args.table) if args.table else tmp / "sens"
        if not (sens / "sensitivity.json").is_file():
            t0 = time.time()
            run_sensitivity(SensitivityConfig(model="cifar:resnet20", output=sens, data=str(train),
                                              bits="w3a4,w4a4,w6a6", weights=str(ckpt),
                                              num_samples=args.sens_samples, seed=args.seed, quiet=True))
            print(f"sensitivity table: {time.time() - t0:.0f} s wall", flush=True)
        table = load_table(sens)
        print("most sensitive (4-bit weights): " + ", ".join(
            r["layer"] for r in sorted(table["layers"], key=lambda r: -r["loss"]["w4a4"]["weight"])[:4]), flush=True)
        base = dict(model="cifar:resnet20", weights=str(ckpt), method="mse", data=str(train),
                    num_samples=args.num_samples, seed=args.seed, quiet=True)
        results: dict[str, list] = {}

        def run(name: str, **kw) -> None:
            t = time.time()
            out = calibrate(CalibrateConfig(output=tmp / name.replace(" ", "_"), **base, **kw))
            rec = QuantRecipe.load(out)
            numels = {n: int(v.numel()) for n, v in rec.int_weights.items()}
            accs = {k: top1(out, x, y) for k, (x, y) in sets.items()}
            results[name] = [mean_weight_bits(rec.plan, numels), accs]
            print(f"{name:<34} mean weight bits {results[name][0]:.3f}  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in accs.items()) + f"  ({time.time() - t:.0f} s)", flush=True)
            low = min(lp.weight.bits for lp in rec.plan.layers)
            print("    above {}: ".format(low) + ", ".join(f"{lp.name} {lp.weight.bits}" for lp in rec.plan.layers
                                                        if lp.weight.bits > low), flush=True)

        b = args.budget
        run("uniform w4a8", bits="w4a8")
        run(f"sensitivity avg {b:g}", bits="auto", auto_bits=AutoBitsConfig(weight_bits_avg=b, sensitivity=str(sens)))
        if not args.skip_below_floor:
            run(f"sensitivity avg {b:g}, below floor", bits="auto",
                auto_bits=AutoBitsConfig(weight_bits_avg=b, sensitivity=str(sens), floor=False))
        run(f"greedy avg {b:g}", bits="auto", auto_bits=AutoBitsConfig(weight_bits_avg=b, allocator="greedy"))
        run(f"labels avg {b:g}", bits="auto", auto_bits=AutoBitsConfig(weight_bits_avg=b, allocator="labels",
                                                                        heldout_images=args.label_images))
        low = int(b)  # the size of uniform W{low}A8: layers may go one bit below it to pay for others
        run(f"labels avg {low}, no floor", bits="auto", auto_bits=AutoBitsConfig(
            weight_bits_avg=float(low), allocator="labels", heldout_images=args.label_images, floor=False))
        numels = {r["layer"]: r["weights"] for r in table["layers"]}
        rand = []
        for s in range(args.random_seeds):
            widths = random_allocation(numels, b, s)
            run(f"random avg {b:g} seed {s}", bits="w8a8",
                layer_bits=tuple(f"{n}={'w%da8' % w}" for n, w in sorted(widths.items())))
            rand.append(results[f"random avg {b:g} seed {s}"][1])
        if rand:
            print(f"random avg {b:g}, mean of {len(rand)} seeds: " + "  ".join(
                f"{k} {sum(r[k] for r in rand) / len(rand):.2f}" for k in sets), flush=True)
        _engine_check(tmp / f"{args.engine_recipe}_avg_{b:g}", test, args.eval_samples)
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
