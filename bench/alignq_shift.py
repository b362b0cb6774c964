"""AlignQ against the straight-through baseline on CIFAR-10 ResNet-20, on test-dev and on a shifted test set.

    python bench/alignq_shift.py --budget 30m [--runs fp32,ste-w4a4,alignq-w4a4,ste-w3a3,alignq-w3a3,
        alignq-w4a4-noadmm,alignq-w4a4-nocdf] [--eval-samples N] [--seed 0] [--threads 2]
        [--epochs E --max-images N] [--recipes NAME=DIR,...] [--engines] [--out DIR]

Every training run uses the QAT trainer with the same budget, seed and the 10,000 shared training images
(``--budget`` wall-clock, or ``--epochs`` over ``--max-images`` images: equal work, the fair choice on a
shared machine where a wall-clock budget buys each run a different amount of CPU); first and last layer stay 8-bit in every quantized run:

* ``fp32``: the BN-folded float model fine-tuned by the same trainer (the reference of every drop);
* ``ste-w4a4`` / ``alignq-w4a4`` (and ``-w3a3``): uniform QAT against AlignQ at equal budget;
* ``alignq-w4a4-noadmm`` / ``alignq-w4a4-nocdf``: the paper's ablation ("CDF only", "ADMM only").

Top-1 (QuantSim, float64 accumulation) on a seeded subset of test-dev and on the shifted set: the same subset of
test-dev corrupted by ``qexport corrupt`` (five corruptions, severity ``--severity``, seed 0), written once to
``DIR/shifted`` and reused; the shifted figure is the mean over the corruptions. ``--recipes`` adds existing
recipes (e.g. brecq, adasg) to the same table. ``--engines`` exports the W4A4 alignq and ste recipes, builds ONNX
Runtime engines (the recipes hold the onnxruntime plan; OpenVINO: bench/alignq_speed.py), measures engine vs
QuantSim agreement and times them against each other (the Erf
and the lookup encodings of alignq against uniform quantization), interleaved in one process.
Results go to ``DIR/results.json`` after each run; rerunning skips finished runs (``--fresh`` redoes them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.bench_utils import top1  # noqa: E402

SHARED = Path(os.environ.get("QEXPORT_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "models/cifar10/resnet20-12fca82f.th"
TRAIN, TEST = SHARED / "data/cifar10/train", SHARED / "data/cifar10/test-dev"
RUNS = {"fp32": ("fp32", "w8a8", {}), "ste-w4a4": ("ste", "w4a4", {}), "alignq-w4a4": ("alignq", "w4a4", {}),
        "ste-w3a3": ("ste", "w3a3", {}), "alignq-w3a3": ("alignq", "w3a3", {}),
        "alignq-w4a4-noadmm": ("alignq", "w4a4", {"admm": False}),
        "alignq-w4a4-nocdf": ("alignq", "w4a4", {"cdf": False})}


def _sets(args) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """test-dev subset and its corrupted copies, as tensors: name -> (x, y)."""
    from qexport.data import load_tensor
    from qexport.data.corrupt import CorruptConfig, corrupted_folders, write_corrupted
    from qexport.models import load_model

    pre = load_model("cifar:resnet20", str(WEIGHTS)).preprocess
    shifted = args.out / "shifted"
    if not (shifted / "corruptions.json").is_file():
        write_corrupted(TEST, shifted, CorruptConfig(severities=(args.severity,), seed=0,
                                                     num_samples=args.eval_samples), force=True)
    sets = {"test-dev": load_tensor(TEST, pre, num_samples=args.eval_samples, seed=0)}
    for folder in corrupted_folders(shifted):
        sets[folder.name] = load_tensor(folder, pre)
    return sets


def _scores(model, sets) -> dict:
    out = {name: top1(model, x, y) for name, (x, y) in sets.items()}
    out["shifted_mean"] = float(np.mean([v for k, v in out.items() if k != "test-dev"]))
    return out


def _options(args, extra: dict) -> dict:
    opts = {"time_budget": args.budget} if args.budget else {"epochs": args.epochs}
    if args.max_images:
        opts["max_images"] = args.max_images
    return {**opts, **extra}


def run_fp32(args, sets) -> dict:
    """Fine-tune the float model with the trainer (qexport.calibrators.qat.FloatMethod)."""
    from qexport.calibrators.base import CalibrationContext
    from qexport.calibrators.qat import FloatMethod, QATConfig
    from qexport.calibrators.qat_task import train
    from qexport.models import fold_batchnorm, load_model
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.quant.spec import BitsConfig

    torch.manual_seed(args.seed)
    loaded = load_model("cifar:resnet20", str(WEIGHTS))
    folded = fold_batchnorm(loaded.model)
    sim = QuantSim(folded, build_plan(folded, "onnxruntime", BitsConfig.parse("w8a8")))
    original = _scores(folded.eval(), sets)
    ctx = CalibrationContext(sim=sim, folded=folded, model=loaded, data=None, labels=None, seed=args.seed,
                             quiet=args.quiet, data_dir=TRAIN)
    metrics = train(ctx, QATConfig(**_options(args, {})), FloatMethod())
    with sim.quant_disabled():
        return {"top1": _scores(sim.eval(), sets), "original_top1": original, "metrics": metrics}


def run_qat(name: str, args, sets) -> dict:
    """Calibrate with ste or alignq through the pipeline; QuantSim top-1 on every set."""
    from qexport.calibrate import CalibrateConfig, calibrate

    method, bits, extra = RUNS[name]
    out = args.out / name
    calibrate(CalibrateConfig(model="cifar:resnet20", weights=str(WEIGHTS), output=out, method=method, bits=bits,
                              first_last_bits=8, data=str(TRAIN), seed=args.seed, force=True, quiet=args.quiet,
                              device="cpu", options=_options(args, extra)))
    return score_recipe(out, sets)


def score_recipe(recipe_dir: Path, sets) -> dict:
    from qexport.recipe import QuantRecipe

    recipe = QuantRecipe.load(recipe_dir)
    sim = recipe.build_quantsim().set_exact_accumulation(True)
    return {"top1": _scores(sim, sets), "metrics": recipe.metrics, "recipe": str(recipe_dir),
            "method": recipe.provenance.get("method"), "bits": recipe.plan.bits.label}


def engines(args, results: dict, sets) -> dict:
    """Engine vs QuantSim agreement (ONNX Runtime) and interleaved latency: alignq (erf, lookup) vs ste."""
    from qexport.build_engine import build_engine_folder
    from qexport.export.qdq import export_recipe
    from qexport.recipe import QuantRecipe
    from qexport.runtimes import load_engine
    from qexport.verify.latency import interleaved_compare

    x, _ = sets["test-dev"]
    out, calls = {}, {}
    variants = [("ste-w4a4", "erf"), ("alignq-w4a4", "erf"), ("alignq-w4a4", "lookup")]
    # The recipes are trained on the onnxruntime plan; export refuses them for another target (OpenVINO pairs
    # recipes calibrated for its own plan: bench/alignq_speed.py).
    for target in ("onnxruntime",):
        for run, enc in variants:
            if run not in results:
                continue
            recipe = Path(results[run]["recipe"])
            key = f"{run}/{enc}/{target}" if run.startswith("alignq") else f"{run}/{target}"
            onnx_path = args.out / "engines" / f"{key.replace('/', '_')}.onnx"
            q, _, _ = export_recipe(recipe, target, onnx_path, force=True, erf_encoding=enc)
            folder = build_engine_folder(q, onnx_path.with_suffix(".engine"), target, threads=args.threads,
                                         force=True)
            eng = load_engine(folder, "int8", args.threads)
            sim = QuantRecipe.load(recipe).build_quantsim().set_exact_accumulation(True)
            if target == "onnxruntime":
                sim.set_engine_arithmetic("onnxruntime")
            with torch.no_grad():
                ref = torch.cat([sim(x[i:i + 500]) for i in range(0, len(x), 500)]).numpy()
            got = np.concatenate([eng.infer(x[i:i + 500].numpy()) for i in range(0, len(x), 500)])
            out[key] = {"agreement": float((got.argmax(1) == ref.argmax(1)).mean()), "images": len(x),
                        "quantsim_arithmetic": sim.arithmetic}
            calls.setdefault(target, {})[key] = eng
    for target, engs in calls.items():
        for b in (1, 64):
            stats = interleaved_compare({k: e.timed_call(b) for k, e in engs.items()}, rounds=args.bench_iters,
                                        warmup=5, batch_size=b)
            for k, s in stats.items():
                out[k][f"p50_ms_batch{b}"] = s.p50_ms
    return out


def _save(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, path)


def _table(results: dict, runs: list[str]) -> str:
    ref = results.get("fp32", {}).get("top1", {})
    lines = ["| run | test-dev top-1 | drop | shifted top-1 (mean of 5) | shifted drop | steps |", "|---|---|---|---|---|---|"]
    for name in runs:
        r = results.get(name)
        if r is None:
            continue
        t = r["top1"]
        d = lambda k: f"{ref[k] - t[k]:.2f}" if ref and name != "fp32" else "-"  # noqa: E731
        lines.append(f"| {name} | {t['test-dev']:.2f} % | {d('test-dev')} | {t['shifted_mean']:.2f} % | "
                     f"{d('shifted_mean')} | {r.get('metrics', {}).get('steps', '-')} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default=None, help="wall-clock budget per training run (30m); default: --epochs")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-images", type=int, default=None, help="train on a seeded subset (default all 10,000)")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--recipes", default="", help="NAME=DIR,... existing recipes scored on the same sets")
    ap.add_argument("--engines", action="store_true", help="engine agreement and speed of alignq vs ste at W4A4")
    ap.add_argument("--bench-iters", type=int, default=100)
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-samples", type=int, default=1000, help="seeded test-dev subset (0: all 5,000)")
    ap.add_argument("--out", type=Path, default=Path("bench_out/alignq"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    args.eval_samples = args.eval_samples or None
    if not WEIGHTS.is_file() or not TRAIN.is_dir():
        print(f"needs the shared ResNet-20 checkpoint and images under {SHARED}", file=sys.stderr)
        return 2
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if [r for r in runs if r not in RUNS]:
        print(f"unknown runs; choose from {', '.join(RUNS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = {} if args.fresh or not path.is_file() else json.loads(path.read_text())
    sets = _sets(args)
    extra = dict(kv.split("=", 1) for kv in args.recipes.split(",") if "=" in kv)
    for name in runs + list(extra):
        if name in results:
            print(f"{name}: done before, skipped")
            continue
        t0 = time.time()
        if name in extra:
            res = score_recipe(Path(extra[name]), sets)
        else:
            res = run_fp32(args, sets) if name == "fp32" else run_qat(name, args, sets)
        res.update({"wall_seconds": round(time.time() - t0, 1), "budget": args.budget, "epochs": args.epochs,
                    "max_images": args.max_images, "seed": args.seed, "threads": args.threads})
        results[name] = res
        _save(path, results)
        print(f"{name}: test-dev {res['top1']['test-dev']:.2f} %, shifted {res['top1']['shifted_mean']:.2f} % "
              f"({res['wall_seconds']:.0f} s)", flush=True)
    if args.engines:
        results["engines"] = engines(args, results, sets)
        _save(path, results)
        for k, v in results["engines"].items():
            print(f"{k}: agreement {100 * v['agreement']:.2f} %, p50 {v['p50_ms_batch1']:.3f} ms (b1), "
                  f"{v['p50_ms_batch64']:.2f} ms (b64)")
    print(_table(results, runs + list(extra)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
