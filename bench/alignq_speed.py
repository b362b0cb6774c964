"""Aligned (Erf) activations on integer engines: speed against uniform quantization, and engine vs QuantSim.

    python bench/alignq_speed.py [--bits w4a4] [--eval-samples 1000] [--iters 200] [--threads 2] [--out DIR]
        [--recipe ALIGNQ_RECIPE]

Builds, for each target's plan, two ResNet-20 recipes with the same calibration (percentile activations, min-max
weights, first and last layer 8-bit, no training): the plan's uniform quantizers, and the same plan with every
Conv-BN-ReLU activation aligned (``Q(2 erf(x / sqrt 2))``, the points ``--method alignq`` trains); or takes a
trained alignq recipe (``--recipe``) and builds its uniform twin. Exports the aligned one as Erf and as a code
lookup, builds ONNX Runtime and OpenVINO engines of all three, and reports engine vs QuantSim top-1 agreement on a
test-dev subset (ONNX Runtime against QuantSim's integer emulation) and p50 latency at batch 1 and 64, all engines
of a runtime timed interleaved in one process (ratios are the figures; absolute times are noisy on a shared
machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("QEXPORT_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "models/cifar10/resnet20-12fca82f.th"
TRAIN, TEST = SHARED / "data/cifar10/train", SHARED / "data/cifar10/test-dev"


def _recipes(args, target: str) -> dict[str, Path] | None:
    """uniform and aligned recipes with the same calibration, on ``target``'s plan (None: the trained ``--recipe``
    was calibrated for another target, which export refuses)."""
    from qexport.calibrators.base import calibrate_activations, set_weight_scales
    from qexport.data import load_tensor
    from qexport.models import fold_batchnorm, load_model
    from qexport.quant.aligned import align_plan, bn_layers
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.quant.spec import BitsConfig
    from qexport.recipe import ModelRef, QuantRecipe

    loaded = load_model("cifar:resnet20", str(WEIGHTS))
    folded = fold_batchnorm(loaded.model)
    x, _ = load_tensor(TRAIN, loaded.preprocess, num_samples=256, seed=0)
    base = build_plan(folded, target, BitsConfig.parse(args.bits, 8))
    aligned, _ = align_plan(base, folded, bn_layers(loaded.model))
    ref = ModelRef("cifar:resnet20", loaded.input_shape, loaded.preprocess.to_dict(), loaded.num_classes,
                   str(WEIGHTS), loaded.weights_sha256)
    out = {}
    for name, plan in (("uniform", base), ("aligned", aligned)):
        if name == "aligned" and args.recipe:
            if QuantRecipe.load(args.recipe).plan.target != target:
                return None
            out[name] = Path(args.recipe)
            continue
        sim = QuantSim(folded, plan)
        set_weight_scales(sim, "minmax")
        calibrate_activations(sim, x, "percentile", quiet=True)
        sim.snap_weights()
        out[name] = QuantRecipe.from_quantsim(sim.eval(), folded, ref, {"method": f"bench-{name}"}).save(
            args.out / f"recipe_{name}_{target}", force=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--recipe", default=None, help="a trained alignq recipe to time instead of the untrained one")
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench_out/alignq_speed"))
    args = ap.parse_args()
    if not WEIGHTS.is_file():
        print(f"needs the shared ResNet-20 checkpoint under {SHARED}", file=sys.stderr)
        return 2
    from qexport.build_engine import build_engine_folder
    from qexport.data import load_tensor
    from qexport.export.qdq import export_recipe
    from qexport.models import load_model
    from qexport.recipe import QuantRecipe
    from qexport.runtimes import load_engine
    from qexport.latency import interleaved_compare
    from qexport.quant.u8s8_saturation import pairs_saturate

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    xt, _ = load_tensor(TEST, load_model("cifar:resnet20", str(WEIGHTS)).preprocess, num_samples=args.eval_samples,
                        seed=0)
    variants = [("uniform", "erf"), ("aligned", "erf"), ("aligned", "lookup")]
    results: dict = {}
    for target in ("onnxruntime", "openvino"):
        recipes = _recipes(args, target)  # each runtime gets recipes calibrated for its target's plan
        if recipes is None:
            print(f"skipping {target}: --recipe was calibrated for another target", file=sys.stderr)
            continue
        engines = {}
        for name, enc in variants:
            key = name if name == "uniform" else f"aligned-{enc}"
            path = args.out / f"{key}_{target}.onnx"
            q, _, _ = export_recipe(recipes[name], target, path, force=True, erf_encoding=enc)
            eng = load_engine(build_engine_folder(q, path.with_suffix(".engine"), target, threads=args.threads,
                                                  force=True), "int8", args.threads)
            sim = QuantRecipe.load(recipes[name]).build_quantsim().set_exact_accumulation(True)
            if target == "onnxruntime":
                sim.set_engine_arithmetic("onnxruntime")
            elif pairs_saturate(target):  # a CPU without VNNI (8-bit first and last layers)
                sim.set_pair_saturation(target)
            with torch.no_grad():
                ref = torch.cat([sim(xt[i:i + 250]) for i in range(0, len(xt), 250)]).numpy()
            got = np.concatenate([eng.infer(xt[i:i + 250].numpy()) for i in range(0, len(xt), 250)])
            results[f"{key}/{target}"] = {"agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
                                          "max_logit_diff": float(np.abs(got - ref).max()),
                                          "quantsim_arithmetic": sim.arithmetic, "images": len(xt)}
            engines[key] = eng
        for b in (1, 64):
            stats = interleaved_compare({k: e.timed_call(b) for k, e in engines.items()}, rounds=args.iters,
                                        warmup=10, batch_size=b)
            for k, s in stats.items():
                results[f"{k}/{target}"][f"p50_ms_b{b}"] = s.p50_ms
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("| engine | agreement with QuantSim | p50 batch 1 (ms) | vs uniform | p50 batch 64 (ms) | vs uniform |")
    print("|---|---|---|---|---|---|")
    for key, r in results.items():
        uni = results[f"uniform/{key.split('/')[1]}"]
        print(f"| {key} | {100 * r['agreement']:.2f} % | {r['p50_ms_b1']:.3f} | {r['p50_ms_b1'] / uni['p50_ms_b1']:.2f}x | "
              f"{r['p50_ms_b64']:.2f} | {r['p50_ms_b64'] / uni['p50_ms_b64']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
