"""QAT on CIFAR-10 ResNet-20: mirror descent (md) against the straight-through baseline (ste) at equal budget.

    python bench/qat_md_vs_ste.py --budget 30m [--runs fp32,md-w2a8,ste-w2a8,md-w1a8,ste-w1a8,md-w1a8-all]
        [--seed 0] [--threads 2] [--engine md-w2a8,md-w1a8] [--eval-samples N] [--engine-samples N] [--curve] [--out DIR]

Every run uses the same trainer, the 10,000 shared training images (10 % held out by the trainer for its
progress bar), the same budget (``--budget`` wall-clock or ``--epochs``) and seed:

* ``fp32``: the BN-folded float model fine-tuned by the same trainer (qexport.calibrators.qat.FloatMethod): the
  reference of every drop, since fine-tuning also adapts the checkpoint to the JPEG images;
* ``md-w2a8`` / ``ste-w2a8``: ternary {-1, 0, 1} md against 2-bit ste, first and last layer 8-bit;
* ``md-w1a8`` / ``ste-w1a8``: binary {-1, +1}, first and last layer 8-bit;
* ``md-w1a8-all``: every layer binary (first and last too).

Top-1 is measured once at the end on test-dev (QuantSim, float64 accumulation; ``--eval-samples`` for a seeded
subset), never during training. ``--engine RUNS`` also exports those recipes, builds ONNX Runtime engines and runs
``qexport verify`` (engine vs QuantSim agreement, on ``--engine-samples`` images). ``--curve`` scores the hard-projected network on test-dev after
every epoch (top-1 against time: run it with a long ``--budget`` and ``--runs md-w1a8``). Results go to
``DIR/results.json`` after each run; rerunning skips finished runs (delete the file or pass ``--fresh`` to redo).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_utils import top1  # noqa: E402
from qexport.options import parse_opt_pairs  # noqa: E402

SHARED = Path(os.environ.get("QEXPORT_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "models/cifar10/resnet20-12fca82f.th"
TRAIN, TEST = SHARED / "data/cifar10/train", SHARED / "data/cifar10/test-dev"
RUNS = {"fp32": ("fp32", "w8a8", None), "md-w2a8": ("md", "w2a8", 8), "ste-w2a8": ("ste", "w2a8", 8),
        "md-w1a8": ("md", "w1a8", 8), "ste-w1a8": ("ste", "w1a8", 8), "md-w1a8-all": ("md", "w1a8", None)}


def _test_set(n: int | None, seed: int):
    from qexport.data import load_tensor
    from qexport.models import load_model

    loaded = load_model("cifar:resnet20", str(WEIGHTS))
    return load_tensor(TEST, loaded.preprocess, num_samples=n, seed=seed)


def _options(args) -> dict:
    opts = {"time_budget": args.budget} if args.budget else {"epochs": args.epochs}
    if args.batch_size:
        opts["batch_size"] = args.batch_size
    opts.update(parse_opt_pairs(args.opt))
    return opts


def _callbacks(points: list, xt, yt, curve: bool):
    """The training loop's callbacks: with ``curve``, test-dev top-1 of the hard-projected network per epoch."""
    from qexport.training import Callbacks

    def on_epoch(task, row):
        with task.method.evaluating(task.sim):
            acc = top1(task.sim, xt, yt)
        points.append({"seconds": row["seconds"], "epoch": row["epoch"], "test_top1": acc,
                       "heldout_top1": row.get("heldout_top1")})
        print(f"  curve: {row['seconds']:7.0f} s epoch {row['epoch']}: test-dev {acc:.2f} %", flush=True)
    return Callbacks(on_epoch_end=on_epoch if curve else None)


def run_fp32(args, xt, yt, curve: list) -> dict:
    """Fine-tune the float model with the trainer; its test-dev top-1."""
    from qexport.calibrators.base import CalibrationContext
    from qexport.calibrators.qat import FloatMethod, QATConfig
    from qexport.calibrators.qat_task import train
    from qexport.models import fold_batchnorm, load_model
    from qexport.options import build_config
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.quant.spec import BitsConfig

    torch.manual_seed(args.seed)
    loaded = load_model("cifar:resnet20", str(WEIGHTS))
    folded = fold_batchnorm(loaded.model)
    sim = QuantSim(folded, build_plan(folded, "onnxruntime", BitsConfig.parse("w8a8")))
    before = top1(folded, xt, yt)
    ctx = CalibrationContext(sim=sim, folded=folded, model=loaded, data=None, labels=None, seed=args.seed,
                             quiet=args.quiet, data_dir=TRAIN, callbacks=_callbacks(curve, xt, yt, args.curve))
    metrics = train(ctx, build_config(QATConfig, _options(args), "fp32", from_text=True), FloatMethod())
    with sim.quant_disabled():
        after = top1(sim, xt, yt)
    return {"test_top1": after, "original_top1": before, "metrics": metrics}


def run_qat(name: str, args, xt, yt, curve: list) -> dict:
    """Calibrate with a QAT method through the pipeline; QuantSim top-1 on test-dev; optionally the engine."""
    from qexport.calibrate import CalibrateConfig, calibrate
    from qexport.recipe import QuantRecipe

    method, bits, fl = RUNS[name]
    out = args.out / name
    calibrate(CalibrateConfig(model="cifar:resnet20", weights=str(WEIGHTS), output=out, method=method, bits=bits,
                              first_last_bits=fl, data=str(TRAIN), seed=args.seed, force=True, quiet=args.quiet,
                              device="cpu", options=_options(args),
                              callbacks=_callbacks(curve, xt, yt, args.curve)))
    recipe = QuantRecipe.load(out)
    sim = recipe.build_quantsim().set_exact_accumulation(True)
    res = {"test_top1": top1(sim, xt, yt), "metrics": recipe.metrics, "recipe": str(out)}
    if name in args.engine:
        res["verify"] = _engine(out, args)
    return res


def _engine(recipe: Path, args) -> dict:
    """export -> build-engine -> verify on the same test-dev subset; the report's accuracy block."""
    exe = [sys.executable, "-m", "qexport.cli"]
    onnx_path, engine, report = recipe.with_suffix(".onnx"), recipe.with_suffix(".engine"), recipe.with_suffix(".report")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    steps = [["export", recipe, "-o", onnx_path, "--force"],
             ["build-engine", onnx_path, "-o", engine, "--force", "--threads", str(args.threads)],
             ["verify", engine, "--recipe", recipe, "--data", TEST, "--bench-batch", "0", "--force", "-q",
              "--report", report, "--seed", str(args.seed)]
             + (["--num-samples", str(args.engine_samples)] if args.engine_samples else [])]
    for cmd in steps:
        subprocess.run(exe + [str(c) for c in cmd], check=True, env=env)
    acc = json.loads((report / "report.json").read_text())["accuracy"]
    return {k: acc.get(k) for k in ("engine_top1", "quantsim_top1", "engine_vs_quantsim_agreement", "fp32_top1")}


def _save(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, path)


def _reference(args) -> dict:
    """The fp32 run of an alignq_shift results file, when its test-dev set and training settings match ours."""
    ref = json.loads(args.reference.read_text()).get("fp32")
    if ref is None:
        raise SystemExit(f"{args.reference} has no fp32 run")
    same = (ref.get("budget"), ref.get("seed"), ref.get("max_images")) == (args.budget, args.seed, None)
    if not same or args.eval_samples is not None or (args.budget is None and ref.get("epochs") != args.epochs):
        raise SystemExit(f"{args.reference}: its fp32 run used another budget, seed, image count or test-dev subset")
    return {"test_top1": ref["top1"]["test-dev"], "original_top1": ref["original_top1"]["test-dev"],
            "metrics": ref["metrics"], "reference": str(args.reference), "wall_seconds": ref["wall_seconds"],
            "threads": ref["threads"], "curve": []}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default=None, help="wall-clock budget per run (30m, 2h); default: --epochs")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--opt", action="append", default=[], help="a trainer or method option key=value for every run "
                    "(e.g. distill=0.5); the fp32 run takes the trainer's")
    ap.add_argument("--engine", default="", help="runs whose recipe is also exported and verified on an engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch and engine threads (1 on a shared machine: 2 threads ran 10x slower under load)")
    ap.add_argument("--eval-samples", type=int, default=None, help="seeded test-dev subset (default: all 5,000)")
    ap.add_argument("--engine-samples", type=int, default=1000, help="seeded test-dev subset for verify (0: all)")
    ap.add_argument("--curve", action="store_true", help="test-dev top-1 after every epoch")
    ap.add_argument("--out", type=Path, default=Path("bench_out/qat"))
    ap.add_argument("--reference", type=Path, default=None,
                    help="take the fp32 reference from bench/alignq_shift.py's results.json (same trainer, budget, "
                         "seed; run there with --eval-samples 0) instead of fine-tuning it again")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if not WEIGHTS.is_file() or not TRAIN.is_dir():
        print(f"needs the shared ResNet-20 checkpoint and images under {SHARED}", file=sys.stderr)
        return 2
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        print(f"unknown runs {bad}; choose from {', '.join(RUNS)}", file=sys.stderr)
        return 2
    args.engine = {r.strip() for r in args.engine.split(",") if r.strip()}
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = {} if args.fresh or not path.is_file() else json.loads(path.read_text())
    xt, yt = _test_set(args.eval_samples, args.seed)
    for name in runs:
        if name in results:
            print(f"{name}: done before ({results[name]['test_top1']:.2f} %), skipped")
            continue
        t0, curve = time.time(), []
        res = run_fp32(args, xt, yt, curve) if name == "fp32" else run_qat(name, args, xt, yt, curve)
        res.update({"wall_seconds": round(time.time() - t0, 1), "budget": args.budget, "epochs": args.epochs,
                    "seed": args.seed, "threads": args.threads, "curve": curve})
        results[name] = res
        _save(path, results)
        print(f"{name}: test-dev top-1 {res['test_top1']:.2f} % ({res['wall_seconds']:.0f} s)", flush=True)
    if args.reference is not None and "fp32" not in results:  # read at the end: it may finish after our start
        results["fp32"] = _reference(args)
        runs = ["fp32"] + [r for r in runs if r != "fp32"]
        _save(path, results)
    ref = results.get("fp32", {}).get("test_top1")
    print("\n| run | test-dev top-1 | drop vs fine-tuned FP32 | steps | engine agreement |\n|---|---|---|---|---|")
    for name in runs:
        r = results[name]
        drop = f"{ref - r['test_top1']:.2f}" if ref is not None and name != "fp32" else "-"
        agree = r.get("verify", {}).get("engine_vs_quantsim_agreement")
        print(f"| {name} | {r['test_top1']:.2f} % | {drop} | {r['metrics'].get('steps')} | "
              f"{'-' if agree is None else f'{100 * agree:.2f} %'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
