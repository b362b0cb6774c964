"""Choosing a QAT method's options on held-out TRAINING images (never test-dev).

Runs ``qexport calibrate`` on ResNet-20 with the shared training folder once per value of one option and prints
the trainer's own held-out top-1 of the final network (the ``--val-fraction`` split of the training folder,
1,000 of the 10,000 images at the default 0.1; for md the hard-projected network), with the steps each run got.

    python bench/qat_heldout.py --method md --bits w1a8 --budget 5m --grid beta_start=1,5,20
    python bench/qat_heldout.py --method md --bits w1a8 --budget 5m --grid lr=0.001,0.003 --opt beta_start=5

Results go to ``DIR/results.json`` (one entry per value, written as each run ends; a rerun skips values done).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from bench_utils import cpu_seconds

from qexport.calibrate import CalibrateConfig, calibrate
from qexport.fileio import write_text_atomic
from qexport.options import parse_opt_pairs
from qexport.recipe import QuantRecipe
from qexport.shared import cifar_checkpoint, cifar_images


def run_one(args, key: str, value: str, out: Path) -> dict:
    """One calibration with ``key=value`` on top of ``--opt``; its held-out top-1, steps and times."""
    options = parse_opt_pairs(args.opt)
    options.update({key: value, "time_budget": args.budget})
    t0, c0 = time.time(), cpu_seconds()
    recipe = calibrate(CalibrateConfig(model="cifar:resnet20", weights=str(cifar_checkpoint(20)), output=out,
                                       method=args.method, bits=args.bits, data=str(cifar_images("train")),
                                       seed=args.seed, first_last_bits=args.first_last_bits, options=options,
                                       quiet=not args.progress, force=True))
    metrics = QuantRecipe.load(recipe).metrics
    history = metrics["history"]
    return {key: value, "options": options, "heldout_top1": history[-1].get("heldout_top1"),
            "heldout_curve": [r.get("heldout_top1") for r in history], "steps": metrics["steps"],
            "epochs": metrics["epochs_run"], "wall_s": round(time.time() - t0), "cpu_s": round(cpu_seconds() - c0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="md")
    ap.add_argument("--bits", default="w1a8")
    ap.add_argument("--first-last-bits", type=int, default=8)
    ap.add_argument("--budget", default="5m", help="wall-clock training budget per run")
    ap.add_argument("--grid", required=True, help="KEY=V1,V2,... the option whose values are compared")
    ap.add_argument("--opt", action="append", default=[], help="another option key=value for every run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench_out/qat_heldout"))
    args = ap.parse_args()
    if cifar_checkpoint(20) is None or cifar_images("train") is None:
        print("shared folder with the CIFAR-10 checkpoint and images not found (QEXPORT_SHARED)", file=sys.stderr)
        return 2
    key, _, values = args.grid.partition("=")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for value in values.split(","):
        name = f"{args.method}-{args.bits}-{key}={value}-" + "-".join(args.opt) + f"-{args.budget}"
        if name in results:
            print(f"{name}: done before, kept")
            continue
        results[name] = run_one(args, key, value, args.out / "recipe")
        write_text_atomic(path, json.dumps(results, indent=1))
        print(json.dumps({"run": name, **results[name]}), flush=True)
    print(f"\n{'run':60s} {'held-out top-1':>14s} {'steps':>6s}")
    for name, r in results.items():
        print(f"{name:60s} {r['heldout_top1']!s:>14s} {r['steps']:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
