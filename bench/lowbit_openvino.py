"""OpenVINO with both low-bit clip forms: float Clip before Q vs Clip on the codes (issue 12).

The exporter writes a sub-8-bit activation either as ``Clip(x) -> Q -> DQ`` or as ``Q -> Clip(codes) -> DQ``
(``qexport.export.qdq.CODE_CLIP_TARGETS``); the two are the same function. This script exports one recipe
(ResNet-20, mse, target ``openvino``, 128 CIFAR-10 train images; shared folder needed) in both forms, builds
both as OpenVINO engines (INT8 with the f32 precision hint, the parity setting), and prints for each: top-1
agreement with the float QuantSim on ``--num-samples`` test-dev images, and the p50 latency at batch 1 and a
throughput batch, timed interleaved in one process (the ratio is the figure on a shared machine).

    python bench/lowbit_openvino.py [--bits w4a4] [--num-samples 1000] [--iters 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import _log  # noqa: E402


def _export(recipe_dir: Path, out: Path, code_clip: bool, threads: int) -> Path:
    from qexport.build_engine import build_engine_folder
    from qexport.export import qdq as qdq_mod

    targets = ("onnxruntime", "openvino") if code_clip else ("onnxruntime",)
    with mock.patch.object(qdq_mod, "CODE_CLIP_TARGETS", targets):
        path, _, _ = qdq_mod.export_recipe(recipe_dir, "openvino", out / "model.onnx")
    return build_engine_folder(path, out / "engine", "openvino", threads=threads)


def main(argv: list[str] | None = None) -> int:
    from qexport import shared
    from qexport.data import ImageFolder, load_tensor
    from qexport.models import Preprocess
    from qexport.calibrate import CalibrateConfig, calibrate
    from qexport.recipe import QuantRecipe
    from qexport.runtimes import load_engine
    from qexport.verify.latency import interleaved_compare

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="w4a4", help="bit widths of the recipe (below 8-bit activations)")
    ap.add_argument("--num-samples", type=int, default=1000, help="test-dev images for the agreement")
    ap.add_argument("--iters", type=int, default=200, help="interleaved rounds at batch 1 (batch 64: iters/8)")
    ap.add_argument("--threads", type=int, default=2, help="OpenVINO threads")
    args = ap.parse_args(argv)
    weights, train, test = shared.cifar_checkpoint(20), shared.cifar_images("train"), shared.cifar_images("test-dev")
    if weights is None or train is None or test is None:
        print("needs the shared CIFAR-10 checkpoint and images (QEXPORT_SHARED or ../shared)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="qexport-lowbit-ov-") as tmp:
        work = Path(tmp)
        _log(f"calibrating resnet20 mse {args.bits} for target openvino (128 images)")
        recipe_dir = calibrate(CalibrateConfig(model="cifar:resnet20", output=work / "recipe", method="mse",
                                               bits=args.bits, target="openvino", weights=str(weights),
                                               data=str(train), num_samples=128, quiet=True))
        engines = {form: _export(recipe_dir, work / form, form == "code_clip", args.threads)
                   for form in ("float_clip", "code_clip")}
        recipe = QuantRecipe.load(recipe_dir)
        x, _ = load_tensor(ImageFolder(test, Preprocess.from_dict(recipe.model.preprocess)),
                           num_samples=args.num_samples, seed=0)
        with torch.no_grad():
            ref = recipe.build_quantsim()(x).numpy().argmax(1)
        runners = {f: load_engine(e, "int8", args.threads) for f, e in engines.items()}
        for f, r in runners.items():
            pred = np.concatenate([r.infer(x[i:i + 250].numpy()) for i in range(0, len(x), 250)]).argmax(1)
            print(f"{f}: top-1 agreement with the float QuantSim {100 * (pred == ref).mean():.2f} % "
                  f"({len(x)} test-dev images)")
        for b in (1, 64):
            calls = {f: r.timed_call(b) for f, r in runners.items()}
            rounds = args.iters if b == 1 else max(10, args.iters // 8)
            st = interleaved_compare(calls, rounds=rounds, warmup=5, batch_size=b)
            print(f"batch {b}: float_clip p50 {st['float_clip'].p50_ms:.3f} ms, code_clip p50 "
                  f"{st['code_clip'].p50_ms:.3f} ms, code_clip speed {st['float_clip'].p50_ms / st['code_clip'].p50_ms:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
