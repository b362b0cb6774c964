"""INT8 engine speed on the CPU: qexport's ONNX Runtime engine vs the FP32 engine and vs ORT's own quantizer.

One run, one process, everything timed interleaved (``qexport.verify.latency.interleaved_compare``), so the
ratios printed at the end are the figures (absolute times on a shared 2-core machine are noisy):

- ``resnet18``: torchvision ResNet-18, random weights, 1x3x224x224, batch 1. qexport ``minmax`` W8A8
  (target onnxruntime) -> ``model.onnx`` + ``model.fp32.onnx`` -> ``build-engine``; ONNX Runtime's
  ``quantize_static`` (u8s8: QUInt8 activations, QInt8 per-channel weights, QDQ format, MinMax) of the very same
  ``model.fp32.onnx`` with the same calibration images, optimized the same way (an onnxruntime engine folder).
  Targets (issue 2): qexport INT8 >= 2.4x FP32; qexport file >= 0.95x the speed of ORT's file.
- ``resnet20``: CIFAR ResNet-20 from the shared checkpoint (skipped with a message when absent), batch 64,
  calibrated on CIFAR-10 train JPEGs. Target: INT8 >= 1.9x FP32.

Calibration images are only there for the ranges (this is a timing benchmark): for ResNet-18 they are 64
seeded synthetic PNGs (smooth random colour fields) written to a temporary folder.

    python bench/engine_speed.py                      # both models, 2 threads
    python bench/engine_speed.py --models resnet18 --iters 300 --threads 2
    python bench/engine_speed.py --fusion             # also print the node types of the ORT-optimized files
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGETS = {"resnet18": {"int8_vs_fp32": 2.4, "qexport_vs_ort": 0.95}, "resnet20": {"int8_vs_fp32": 1.9}}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_synthetic_pngs(folder: Path, n: int = 64, size: int = 256, seed: int = 0) -> Path:
    """Seeded smooth random-colour images (8x8 noise upsampled bilinearly), as PNGs in a flat folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
        Image.fromarray(base).resize((size, size), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return folder


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a preprocessed image tensor, one image per call."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = 1):
        self.x, self.name, self.batch, self.i = x, input_name, batch, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        out = {self.name: self.x[self.i:self.i + self.batch]}
        self.i += self.batch
        return out

    def rewind(self):
        self.i = 0


def materialize_shared_initializers(src: Path, dst: Path) -> tuple[Path, int]:
    """Copy ``src`` with every ``Identity(initializer)`` replaced by its own initializer.

    The TorchScript exporter dedups identical initializers (random-weight BN folding gives many all-zero conv
    biases) and feeds the duplicates through Identity nodes; ORT's quantizer then finds a bias that is not an
    initializer ("Expected bias ... to be an initializer") and leaves that Conv in float, which would make its
    file look slower than it is. The float model is unchanged.

    Returns:
        (dst, number of Identity nodes replaced).
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    inits = {t.name: t for t in m.graph.initializer}
    keep, n = [], 0
    for node in m.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            m.graph.initializer.append(numpy_helper.from_array(arr.copy(), node.output[0]))
            n += 1
        else:
            keep.append(node)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    onnx.save(m, str(dst))
    return dst, n


def ort_quantize(fp32_onnx: Path, out: Path, calib: np.ndarray) -> Path:
    """ONNX Runtime's own static quantizer: u8s8, per-channel weights, QDQ, MinMax."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    src, n = materialize_shared_initializers(fp32_onnx, out.with_name(out.stem + ".src.onnx"))
    if n:
        _log(f"  {n} Identity(initializer) nodes (deduplicated biases) materialized for ORT's quantizer")
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(calib.astype(np.float32), "input")
    quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


def prepare(name: str, work: Path, threads: int) -> dict | None:
    """Calibrate + export + build qexport's engine and ORT's quantized engine for one model.

    Returns:
        {"engine": qexport engine folder, "ort_engine": engine folder of ORT's file, "batch": timed batch}, or
        None when the model's inputs are not available here.
    """
    from qexport import shared
    from qexport.data import ImageFolder, load_tensor
    from qexport.build_engine import build_engine_folder
    from qexport.export.qdq import export_recipe
    from qexport.models import Preprocess
    from qexport.calibrate import CalibrateConfig, calibrate
    from qexport.recipe import QuantRecipe
    from qexport.runtimes import get_runtime

    if name == "resnet18":
        spec, weights, batch, n = "torchvision:resnet18", None, 1, 64
        data = write_synthetic_pngs(work / "calib_images", n=n)
    elif name == "resnet20":
        weights, data = shared.cifar_checkpoint(20), shared.cifar_images("train")
        if weights is None or data is None:
            _log("resnet20: skipped (no shared CIFAR-10 checkpoint/images: set QEXPORT_SHARED or put ../shared "
                 "beside the repository)")
            return None
        spec, batch, n = "cifar:resnet20", 64, 256
    else:
        raise SystemExit(f"unknown model {name!r}; choose resnet18 or resnet20")
    d = work / name
    _log(f"{name}: calibrating (minmax, w8a8, {n} images)")
    recipe_dir = calibrate(CalibrateConfig(model=spec, output=d / "recipe", method="minmax", bits="w8a8",
                                           target="onnxruntime", weights=str(weights) if weights else None,
                                           data=str(data), num_samples=n, quiet=True, device="cpu"))
    _log(f"{name}: exporting (target onnxruntime)")
    qdq, fp32, _ = export_recipe(recipe_dir, "onnxruntime", d / "model.onnx")
    engine = build_engine_folder(qdq, d / "engine", "onnxruntime", threads=threads)
    _log(f"{name}: ONNX Runtime quantize_static (u8s8, per-channel, QDQ) of {fp32.name}")
    recipe = QuantRecipe.load(recipe_dir)
    x, _ = load_tensor(ImageFolder(data, Preprocess.from_dict(recipe.model.preprocess)), num_samples=n, seed=0)
    ort_file = ort_quantize(fp32, d / "ort_quant.onnx", x.numpy())
    ort_engine = get_runtime("onnxruntime").build_engine(ort_file, d / "ort_engine", fp32_onnx=None,
                                                         threads=threads)
    return {"engine": engine, "ort_engine": ort_engine, "batch": batch, "qdq": qdq, "fp32": fp32,
            "ort_file": ort_file}


def time_model(name: str, built: dict, threads: int, iters: int) -> dict:
    """Interleaved timing of FP32, qexport INT8 and ORT-quantizer INT8 engines at the model's batch size."""
    from qexport.runtimes import load_engine
    from qexport.verify.latency import interleaved_compare

    b = built["batch"]
    runners = {"fp32": load_engine(built["engine"], "fp32", threads),
               "qexport_int8": load_engine(built["engine"], "int8", threads),
               "ort_quantizer_int8": load_engine(built["ort_engine"], "int8", threads)}
    calls = {k: r.timed_call(b) for k, r in runners.items()}
    rounds = max(5, iters if b == 1 else max(10, iters // 8))
    _log(f"{name}: timing {len(calls)} engines interleaved, batch {b}, {threads} threads, {rounds} rounds")
    stats = interleaved_compare(calls, rounds=rounds, warmup=10 if b == 1 else 3, batch_size=b)
    return {"batch": b, "stats": stats,
            "int8_vs_fp32": stats["fp32"].p50_ms / stats["qexport_int8"].p50_ms,
            "ort_vs_fp32": stats["fp32"].p50_ms / stats["ort_quantizer_int8"].p50_ms,
            "qexport_vs_ort": stats["ort_quantizer_int8"].p50_ms / stats["qexport_int8"].p50_ms}


def node_types(onnx_path: Path, threads: int, level: str = "ORT_ENABLE_EXTENDED") -> collections.Counter:
    """Op types of the model ONNX Runtime's optimizer produces from a file (what actually runs)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as t:
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.intra_op_num_threads = threads
        so.optimized_model_filepath = str(Path(t) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        m = onnx.load(so.optimized_model_filepath)
    return collections.Counter(n.op_type for n in m.graph.node)


def fusion_report(name: str, built: dict, threads: int) -> None:
    """Print the optimized node types of qexport's file vs ORT's file (float Conv left = unfused)."""
    a, b = node_types(built["qdq"], threads), node_types(built["ort_file"], threads)
    print(f"\n{name}: node types after ORT's optimizer (ORT_ENABLE_EXTENDED): qexport vs ORT quantizer")
    for op in sorted(set(a) | set(b)):
        mark = "" if a[op] == b[op] else "   <-- differs"
        print(f"  {op:<24} {a[op]:>4} {b[op]:>4}{mark}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_results(results: dict, threads: int) -> None:
    import os

    import onnxruntime as ort

    print(f"\n== engine_speed ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {_cpu_name()}, "
          f"{len(os.sched_getaffinity(0))} cores visible, "
          f"onnxruntime {ort.__version__}, {threads} threads; p50 latency per batch, interleaved in one process)")
    for name, r in results.items():
        s, b, t = r["stats"], r["batch"], TARGETS[name]
        print(f"{name} batch {b}: FP32 {s['fp32'].p50_ms:.2f} ms | qexport INT8 {s['qexport_int8'].p50_ms:.2f} ms | "
              f"ORT-quantizer INT8 {s['ort_quantizer_int8'].p50_ms:.2f} ms")
        ok = "PASS" if r["int8_vs_fp32"] >= t["int8_vs_fp32"] else "FAIL"
        print(f"  qexport INT8 vs FP32 speed-up:     {r['int8_vs_fp32']:.2f}x  (target >= {t['int8_vs_fp32']}x: {ok})")
        print(f"  ORT-quantizer INT8 vs FP32:        {r['ort_vs_fp32']:.2f}x")
        line = f"  qexport vs ORT-quantizer file:     {r['qexport_vs_ort']:.2f}x"
        if "qexport_vs_ort" in t:
            ok = "PASS" if r["qexport_vs_ort"] >= t["qexport_vs_ort"] else "FAIL"
            line += f"  (target >= {t['qexport_vs_ort']}x: {ok})"
        print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,resnet20", help="comma-separated: resnet18, resnet20")
    ap.add_argument("--iters", type=int, default=200, help="interleaved rounds at batch 1 (batch 64: iters/8)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every session")
    ap.add_argument("--fusion", action="store_true", help="print ORT-optimized node types of both INT8 files")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    ap.add_argument("--openvino", action="store_true",
                    help="then run bench/engine_speed_openvino.py's main() with the same --iters/--threads")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in TARGETS]
    if bad or not models:
        ap.error(f"--models: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(TARGETS)}")
    with tempfile.TemporaryDirectory(prefix="qexport-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {}
        for name in models:
            built = prepare(name, work, args.threads)
            if built is None:
                continue
            if args.fusion:
                fusion_report(name, built, args.threads)
            results[name] = time_model(name, built, args.threads, args.iters)
        print_results(results, args.threads)
    if args.openvino:
        ov = Path(__file__).with_name("engine_speed_openvino.py")
        if not ov.is_file():
            print(f"--openvino: {ov} does not exist (yet); nothing to run", file=sys.stderr)
            return 2
        import importlib.util

        mod_spec = importlib.util.spec_from_file_location("engine_speed_openvino", ov)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        import inspect

        takes_args = bool(inspect.signature(mod.main).parameters)
        fwd = ["--iters", str(args.iters), "--threads", str(args.threads)]
        return int((mod.main(fwd) if takes_args else mod.main()) or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
