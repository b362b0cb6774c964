"""OpenVINO with both forms of a low-bit activation clip: the float ``Clip -> Q -> DQ`` the openvino target
exports, and the integer ``Q -> Clip(codes) -> DQ`` the onnxruntime target exports (issue 12, item 1: "measure
OpenVINO with both forms and keep the faster exact one per target").

One recipe per model (``minmax``, target ``openvino``, W4A4 by default) is exported twice: as ``qexport export``
writes it, and with the descriptor's ``code_clip`` turned on (a bench-only variant of the openvino target; the
file is otherwise identical). Both files are built as OpenVINO engines, then

- exactness: ``qexport verify`` of each engine against the same recipe (top-1 agreement with QuantSim, max
  logit difference), on held-out CIFAR-10 test-dev images for ResNet-20;
- speed: both INT8 engines and the FP engine timed interleaved in one process (batch 1, and 64 for ResNet-20).

    python bench/openvino_clip_forms.py                       # ResNet-20 (needs ../shared) and ResNet-18
    python bench/openvino_clip_forms.py --models resnet20 --bits w3a3 --num-samples 5000
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import _log, write_synthetic_pngs  # noqa: E402

VARIANT = "openvino_code_clip"
MODELS = {"resnet20": ("cifar:resnet20", 256, (1, 64)), "resnet18": ("torchvision:resnet18", 64, (1,))}


def register_code_clip_variant() -> None:
    """The openvino descriptor with the onnxruntime target's clip on the codes (the plan is the same)."""
    from qexport.quant.targets import get_target, list_targets, register_target

    if VARIANT not in list_targets():
        register_target(dataclasses.replace(get_target("openvino"), name=VARIANT, code_clip=True,
                                            exact_clip_bounds=False))


def export_both(recipe_dir: Path, work: Path) -> dict:
    """``{"float_clip": file, "code_clip": file}``: the standard export and the code-clip variant."""
    import onnx

    from qexport.export.qdq import build_qdq_model, export_recipe, recipe_fingerprint
    from qexport.recipe import QuantRecipe

    files = {"float_clip": export_recipe(recipe_dir, "openvino", work / "float_clip.onnx")[0]}
    model = build_qdq_model(QuantRecipe.load(recipe_dir), VARIANT,
                            meta={"qexport.recipe_sha256": recipe_fingerprint(recipe_dir)})
    for p in model.metadata_props:  # build-engine takes files made for its own target
        if p.key == "qexport.target":
            p.value = "openvino"
    files["code_clip"] = work / "code_clip.onnx"
    onnx.save(model, str(files["code_clip"]))
    clips = {k: sum(n.op_type == "Clip" for n in onnx.load(str(f)).graph.node) for k, f in files.items()}
    _log(f"  Clip nodes: float form {clips['float_clip']}, code form {clips['code_clip']}")
    return files


def build(name: str, args, work: Path) -> dict:
    """Calibrate for openvino, export both forms, build an OpenVINO engine of each."""
    from qexport.build_engine import build_engine_folder
    from qexport.calibrate import CalibrateConfig, calibrate
    from qexport.export.qdq import fp32_path_for

    spec, n_cal, _ = MODELS[name]
    if name == "resnet20":
        from qexport.shared import shared_dir
        weights, data = shared_dir() / "models/cifar10/resnet20-12fca82f.th", shared_dir() / "data/cifar10/train"
    else:
        weights, data = None, write_synthetic_pngs(work / "calib_images", n=n_cal)
    _log(f"{name}: calibrating (minmax, {args.bits}, target openvino, {n_cal} images)")
    recipe = calibrate(CalibrateConfig(model=spec, weights=weights and str(weights), output=work / "recipe",
                                       method="minmax", bits=args.bits, target="openvino", data=str(data),
                                       num_samples=n_cal, quiet=True, device="cpu"))
    files = export_both(recipe, work)
    engines = {}
    for form, f in files.items():
        fp32 = fp32_path_for(work / "float_clip.onnx") if form == "float_clip" else None
        engines[form] = build_engine_folder(f, work / f"engine_{form}", "openvino", fp32=fp32,
                                            threads=args.threads)
    return {"recipe": recipe, "engines": engines}


def exactness(built: dict, args) -> dict:
    """verify's agreement and max logit difference of each form against QuantSim (ResNet-20, test-dev)."""
    from qexport.shared import shared_dir
    from qexport.verify.compare import VerifyConfig, verify

    out = {}
    for form, eng in built["engines"].items():
        rep, _ = verify(VerifyConfig(engine=eng, recipe=built["recipe"], data=shared_dir() / "data/cifar10/test-dev",
                                     num_samples=args.num_samples, bench_batch_sizes=(), quiet=True,
                                     divergence=False, threads=args.threads))
        out[form] = rep
    return out


def timing(name: str, built: dict, args) -> dict:
    """batch -> engine -> p50 ms, the two INT8 forms and the FP engine interleaved."""
    from qexport.latency import interleaved_compare
    from qexport.runtimes import load_engine

    runners = {form: load_engine(e, "int8", args.threads) for form, e in built["engines"].items()}
    runners["fp"] = load_engine(built["engines"]["float_clip"], "fp32", args.threads)
    out = {}
    for b in MODELS[name][2]:
        rounds = args.iters if b == 1 else max(10, args.iters // 8)
        _log(f"{name}: timing {len(runners)} engines interleaved, batch {b}, {rounds} rounds")
        stats = interleaved_compare({k: r.timed_call(b) for k, r in runners.items()}, rounds=rounds, warmup=5,
                                    batch_size=b)
        out[b] = {k: s.p50_ms for k, s in stats.items()}
    return out


def print_model(name: str, exact: dict | None, times: dict) -> None:
    """One block per model: agreement and logit difference per form, then the speed ratios."""
    if exact:
        for form, rep in exact.items():
            a = rep["accuracy"]
            print(f"{name} {form:10s}: engine top-1 {100 * a['engine_top1']:.2f} %, vs QuantSim agreement "
                  f"{100 * a['engine_vs_quantsim_agreement']:.2f} % ({a['disagreements']} off), max |logit diff| "
                  f"{a['logit_abs_diff_max']:.2e}")
    for b, p50 in times.items():
        print(f"{name} batch {b}: p50 float_clip {p50['float_clip']:.3f} ms | code_clip {p50['code_clip']:.3f} ms "
              f"| fp {p50['fp']:.3f} ms; code/float speed {p50['float_clip'] / p50['code_clip']:.2f}x, "
              f"float_clip vs FP {p50['fp'] / p50['float_clip']:.2f}x, code_clip vs FP "
              f"{p50['fp'] / p50['code_clip']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet20,resnet18", help="comma-separated: resnet20, resnet18")
    ap.add_argument("--bits", default="w4a4", help="bit widths of the recipe (activations below 8 bits)")
    ap.add_argument("--num-samples", type=int, default=2000, help="test-dev images for the exactness check")
    ap.add_argument("--iters", type=int, default=200, help="interleaved rounds at batch 1 (batch 64: iters/8)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args(argv)
    from qexport.shared import shared_dir

    register_code_clip_variant()
    with tempfile.TemporaryDirectory(prefix="qexport-ovclip-") as tmp:
        root = args.keep or Path(tmp)
        results = []
        for name in args.models.split(","):
            if name == "resnet20" and shared_dir() is None:
                _log("resnet20 skipped: ../shared (or $QEXPORT_SHARED) is absent")
                continue
            work = root / name
            work.mkdir(parents=True, exist_ok=True)
            built = build(name, args, work)
            exact = exactness(built, args) if name == "resnet20" else None
            results.append((name, exact, timing(name, built, args)))
    print(f"\n== openvino_clip_forms ({args.bits}, {args.threads} threads, p50 of interleaved calls)")
    for row in results:
        print_model(*row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
