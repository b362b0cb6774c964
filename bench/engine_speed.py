"""INT8 engine speed on the CPU: qexport's ONNX Runtime engines at W8A8/W4A8/W4A4/W3A3 vs the FP32 engine and
vs ORT's own quantizer.

One run, one process, everything timed interleaved (``qexport.latency.interleaved_compare``), so the
ratios printed at the end are the figures (absolute times on a shared 2-core machine are noisy):

- ``resnet18``: torchvision ResNet-18, random weights, 1x3x224x224, batch 1. qexport ``minmax`` at each
  ``--bits`` (target onnxruntime) -> ``model.onnx`` + ``model.fp32.onnx`` -> ``build-engine``; ONNX Runtime's
  ``quantize_static`` (u8s8: QUInt8 activations, QInt8 per-channel weights, QDQ format, MinMax) of the very same
  ``model.fp32.onnx`` with the same calibration images, optimized the same way (an onnxruntime engine folder).
- ``resnet20``: CIFAR ResNet-20 from the shared checkpoint (skipped with a message when absent), batch 1 and
  batch 64, calibrated on CIFAR-10 train JPEGs.

Targets: W8A8 >= 3.0x FP32 on ResNet-18 (issue 12; issue 2 asked 2.4x) and >= 1.9x on ResNet-20 (issue 2);
every lower width at least 0.9x the W8A8 engine's speed (issue 12). ``--fusion`` prints what ONNX Runtime's
optimizer leaves of each file (every Conv should be a QLinearConv). Calibration images are only there for the
ranges (a timing benchmark): for ResNet-18, 64 seeded synthetic PNGs (smooth random colour fields).

    python bench/engine_speed.py                      # both models, all four widths, 2 threads
    python bench/engine_speed.py --models resnet18 --bits w8a8,w4a4 --iters 300 --threads 2
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

# name -> (model spec, weights, timed batch sizes, calibration images)
MODELS = {"resnet18": ("torchvision:resnet18", None, (1,), 64), "resnet20": ("cifar:resnet20", None, (1, 64), 256)}
BITS = ("w8a8", "w4a8", "w4a4", "w3a3")
W8A8_VS_FP32 = {"resnet18": 3.0, "resnet20": 1.9}  # issue 12 (ResNet-18) and issue 2 (ResNet-20) targets
LOWBIT_VS_W8A8 = 0.9  # issue 12: every low-bit engine at least as fast as W8A8 within 10 %


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


def prepare(name: str, work: Path, threads: int, bits: tuple[str, ...] = ("w8a8",)) -> dict | None:
    """Calibrate + export + build qexport's engines (one per bit width) and ORT's quantized engine for one model.

    Returns:
        {"engines": bits -> qexport engine folder, "qdq": bits -> QDQ file, "ort_engine", "ort_file", "fp32",
        "batches": timed batch sizes}, or None when the model's inputs are not available here.
    """
    from qexport import shared
    from qexport.data import ImageFolder, load_tensor
    from qexport.build_engine import build_engine_folder
    from qexport.export.qdq import export_recipe
    from qexport.models import Preprocess
    from qexport.calibrate import CalibrateConfig, calibrate
    from qexport.recipe import QuantRecipe
    from qexport.runtimes import get_runtime

    spec, weights, batches, n = MODELS[name]
    if name == "resnet18":
        data = write_synthetic_pngs(work / "calib_images", n=n)
    else:
        weights, data = shared.cifar_checkpoint(20), shared.cifar_images("train")
        if weights is None or data is None:
            _log(f"{name}: skipped (no shared CIFAR-10 checkpoint/images: set QEXPORT_SHARED or put ../shared "
                 "beside the repository)")
            return None
    d = work / name
    built: dict = {"engines": {}, "qdq": {}, "batches": batches}
    for b in bits:
        _log(f"{name}: calibrating (minmax, {b}, {n} images), exporting (target onnxruntime), building")
        recipe_dir = calibrate(CalibrateConfig(model=spec, output=d / b / "recipe", method="minmax", bits=b,
                                               target="onnxruntime", weights=str(weights) if weights else None,
                                               data=str(data), num_samples=n, quiet=True, device="cpu"))
        qdq, fp32, _ = export_recipe(recipe_dir, "onnxruntime", d / b / "model.onnx")
        built["qdq"][b], built["fp32"] = qdq, fp32
        built["engines"][b] = build_engine_folder(qdq, d / b / "engine", "onnxruntime", threads=threads)
    _log(f"{name}: ONNX Runtime quantize_static (u8s8, per-channel, QDQ) of {built['fp32'].name}")
    recipe = QuantRecipe.load(recipe_dir)
    x, _ = load_tensor(ImageFolder(data, Preprocess.from_dict(recipe.model.preprocess)), num_samples=n, seed=0)
    built["ort_file"] = ort_quantize(built["fp32"], d / "ort_quant.onnx", x.numpy())
    built["ort_engine"] = get_runtime("onnxruntime").build_engine(built["ort_file"], d / "ort_engine",
                                                                  fp32_onnx=None, threads=threads)
    return built


def interleaved_p50_min(calls: dict, rounds: int, warmup: int, settle: int = 1) -> dict:
    """Interleaved timing (order shuffled each round) returning name -> (p50 ms, min ms) per call.

    The p50 ratios are the figures. The minimum is printed beside them: on a quiet machine the two agree; at a
    load average of 20+ on 2 cores the minima scattered by 2x between structurally identical files (W8A8 vs
    W4A8) while the p50 ratios stayed within a few per cent. Each timed call follows ``settle`` untimed calls
    of the same engine, as in ``qexport.latency.interleaved_compare``; the sessions of ``load_engine`` do not
    spin-wait (a spinning ORT pool took the cores from the next engine: ResNet-18 W8A8 median 20 ms vs 7.6 ms).
    """
    names = list(calls)
    for n in names:
        for _ in range(warmup):
            calls[n]()
    times: dict = {n: [] for n in names}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for n in rng.permutation(names):  # a seeded shuffle each round: no engine always follows the same one
            for _ in range(settle):
                calls[n]()
            t0 = time.perf_counter()
            calls[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: (1e3 * float(np.median(v)), 1e3 * float(np.min(v))) for n, v in times.items()}


def time_model(name: str, built: dict, threads: int, iters: int) -> dict:
    """Interleaved timing of FP32, each qexport engine and the ORT-quantizer engine, per batch size.

    Returns:
        batch -> {"p50": engine -> ms, "min": engine -> ms}.
    """
    from qexport.runtimes import load_engine

    first = next(iter(built["engines"].values()))
    runners = {"fp32": load_engine(first, "fp32", threads)}
    runners.update({b: load_engine(e, "int8", threads) for b, e in built["engines"].items()})
    runners["ort_quantizer"] = load_engine(built["ort_engine"], "int8", threads)
    out = {}
    for b in built["batches"]:
        calls = {k: r.timed_call(b) for k, r in runners.items()}
        rounds = max(5, iters if b == 1 else max(10, iters // 8))
        _log(f"{name}: timing {len(calls)} engines interleaved, batch {b}, {threads} threads, {rounds} rounds")
        t = interleaved_p50_min(calls, rounds, warmup=10 if b == 1 else 3)
        out[b] = {"p50": {k: v[0] for k, v in t.items()}, "min": {k: v[1] for k, v in t.items()}}
    return out


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
    """Print the optimized node types of each qexport file and ORT's file (a float Conv left = unfused)."""
    counts = {b: node_types(q, threads) for b, q in built["qdq"].items()}
    counts["ORT quantizer"] = node_types(built["ort_file"], threads)
    ops = sorted(set().union(*counts.values()))
    print(f"\n{name}: node types after ORT's optimizer (ORT_ENABLE_EXTENDED)")
    print("  " + f"{'op':<26}" + "".join(f"{k:>15}" for k in counts))
    for op in ops:
        print("  " + f"{op:<26}" + "".join(f"{c[op]:>15}" for c in counts.values()))
    for k, c in counts.items():
        ok = c["Conv"] == 0 and c["QLinearConv"] > 0
        print(f"  {k}: every Conv a QLinearConv: {'yes' if ok else 'NO'} ({c['QLinearConv']} QLinearConv, "
              f"{c['Conv']} float Conv)")


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
          f"{len(os.sched_getaffinity(0))} cores visible, load average {os.getloadavg()[0]:.1f}, "
          f"onnxruntime {ort.__version__}, {threads} threads; latency per batch, interleaved in one process)")
    for name, per_batch in results.items():
        for b, r in per_batch.items():
            print(f"{name} batch {b}: p50 " + " | ".join(f"{k} {v:.2f} ms" for k, v in r["p50"].items()))
            print(f"{name} batch {b}: min " + " | ".join(f"{k} {v:.2f} ms" for k, v in r["min"].items()))
            for stat in ("p50", "min"):
                sp = {k: r[stat]["fp32"] / v for k, v in r[stat].items()}
                print(f"  [{stat}] speed-up vs FP32: " + ", ".join(f"{k} {v:.2f}x" for k, v in sp.items() if k != "fp32"))
                if "w8a8" not in sp:
                    continue
                t = W8A8_VS_FP32[name]
                line = (f"  [{stat}] w8a8 vs FP32 {sp['w8a8']:.2f}x (target >= {t}x: "
                        f"{'PASS' if sp['w8a8'] >= t else 'FAIL'}); w8a8 vs ORT file {sp['w8a8'] / sp['ort_quantizer']:.2f}x")
                for k in [k for k in sp if k not in ("fp32", "w8a8", "ort_quantizer")]:
                    rel = sp[k] / sp["w8a8"]
                    line += f"; {k}/w8a8 {rel:.2f}x {'PASS' if rel >= LOWBIT_VS_W8A8 else 'FAIL'}"
                print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,resnet20", help="comma-separated: resnet18, resnet20")
    ap.add_argument("--bits", default=",".join(BITS), help="comma-separated qexport bit widths to build and time")
    ap.add_argument("--iters", type=int, default=200, help="interleaved rounds at batch 1 (batch 64: iters/8)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every session")
    ap.add_argument("--fusion", action="store_true", help="print ORT-optimized node types of both INT8 files")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    ap.add_argument("--openvino", action="store_true",
                    help="then run bench/engine_speed_openvino.py's main() with the same --iters/--threads")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bits = tuple(b.strip() for b in args.bits.split(",") if b.strip())
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        ap.error(f"--models: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(MODELS)}")
    if not bits:
        ap.error("--bits: give at least one bit width, e.g. w8a8")
    with tempfile.TemporaryDirectory(prefix="qexport-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {}
        for name in models:
            built = prepare(name, work, args.threads, bits)
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
