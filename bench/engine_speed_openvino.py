"""OpenVINO INT8 engine speed vs ONNX Runtime INT8 and vs OpenVINO's own FP engine (issue 6).

One run, one process, all engines timed interleaved (``qexport.latency.interleaved_compare``), 2 threads,
batch 1, torchvision ResNet-18 (random weights) at 1x3x224x224. Calibration is ``minmax`` W8A8 for target
``openvino`` on 64 seeded synthetic PNGs (a timing benchmark: only the ranges matter). The very same QDQ file is
built as an ``openvino`` engine (INT8 compiled with ``INFERENCE_PRECISION_HINT=f32``, the parity setting; its FP
baseline with OpenVINO's default, bf16 on this CPU) and as an ``onnxruntime`` engine (the openvino encoding is
ORT's u8s8 encoding); a second recipe calibrated for target ``onnxruntime`` (its plan adds the fusion points
ORT wants) gives ORT's best INT8 engine and the ORT FP32 engine. The INT8 ratio is taken against the faster of
the two ORT INT8 engines. Also timed: the INT8 IR compiled with OpenVINO's default precision, to show what the
f32 hint costs.

Targets: OpenVINO INT8 >= 2.5x faster than ONNX Runtime INT8, and >= 1.5x faster than OpenVINO's FP engine.

    python bench/engine_speed_openvino.py                 # 2 threads, 300 rounds
    python bench/engine_speed_openvino.py --iters 500 --keep /tmp/ovbench
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

TARGETS = {"ov_int8_vs_ort_int8": 2.5, "ov_int8_vs_ov_fp": 1.5}


# Shared with the ONNX Runtime bench beside this file (same synthetic calibration images, same log format).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import _log, write_synthetic_pngs as _synthetic_pngs  # noqa: E402


def _ort_engine(qdq: Path, fp32: Path | None, out: Path, threads: int) -> Path | None:
    """ORT engine of a QDQ file, or None (with a message) when ORT's engine build refuses it."""
    from qexport.errors import QexportError
    from qexport.runtimes import get_runtime

    try:
        return get_runtime("onnxruntime").build_engine(qdq, out, fp32_onnx=fp32, threads=threads)
    except QexportError as e:
        _log(f"  skipped: {e}")
        return None


def prepare(work: Path, threads: int, num_samples: int = 64) -> dict:
    """Calibrate and export for openvino and for onnxruntime; build the engines."""
    from qexport.build_engine import build_engine_folder
    from qexport.export.qdq import export_recipe
    from qexport.calibrate import CalibrateConfig, calibrate

    data = _synthetic_pngs(work / "calib_images", n=num_samples)
    files = {}
    for target in ("openvino", "onnxruntime"):
        _log(f"resnet18: calibrating (minmax, w8a8, target {target}, {num_samples} synthetic images)")
        recipe = calibrate(CalibrateConfig(model="torchvision:resnet18", output=work / f"recipe_{target}",
                                           method="minmax", bits="w8a8", target=target, data=str(data),
                                           num_samples=num_samples, quiet=True, device="cpu"))
        files[target] = export_recipe(recipe, target, work / f"model_{target}.onnx")[:2]
    _log("resnet18: building the openvino engine")
    ov_engine = build_engine_folder(files["openvino"][0], work / "ov_engine", "openvino", threads=threads)
    _log("resnet18: building the onnxruntime engines (its own export; the openvino file)")
    ort_engine = _ort_engine(*files["onnxruntime"], work / "ort_engine", threads)
    ort_same = _ort_engine(files["openvino"][0], None, work / "ort_engine_same_file", threads)
    return {"ov_engine": ov_engine, "ort_engine": ort_engine, "ort_same_file": ort_same}


def _ov_default_precision_runner(engine: Path, threads: int):
    """The engine's INT8 IR compiled with OpenVINO's default inference precision (bf16 on AMX/AVX512-BF16)."""
    import openvino as ov

    from qexport.runtimes.engine_folder import read_engine_meta
    from qexport.runtimes.openvino_rt import OpenVinoRunner

    meta = read_engine_meta(engine, target="openvino", which="int8")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(Path(engine) / meta["models"]["int8"])), "CPU",
                                  {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    return OpenVinoRunner(compiled, meta, "int8", threads)


def time_engines(built: dict, threads: int, iters: int) -> dict:
    """Interleaved batch-1 timing of every engine; returns the stats and the ratios."""
    from qexport.runtimes import load_engine
    from qexport.latency import interleaved_compare

    runners = {"ov_int8": load_engine(built["ov_engine"], "int8", threads),
               "ov_fp": load_engine(built["ov_engine"], "fp32", threads),
               "ov_int8_default_precision": _ov_default_precision_runner(built["ov_engine"], threads),
               "ort_int8": load_engine(built["ort_engine"], "int8", threads),
               "ort_fp32": load_engine(built["ort_engine"], "fp32", threads)}
    if built.get("ort_same_file") is not None:
        runners["ort_int8_openvino_file"] = load_engine(built["ort_same_file"], "int8", threads)
    calls = {k: r.timed_call(1) for k, r in runners.items()}
    _log(f"timing {len(calls)} engines interleaved, batch 1, {threads} threads, {iters} rounds")
    stats = interleaved_compare(calls, rounds=iters, warmup=10, batch_size=1)
    p50 = {k: s.p50_ms for k, s in stats.items()}
    ort_best = min(p50["ort_int8"], p50.get("ort_int8_openvino_file", np.inf))
    return {"stats": stats,
            "ov_int8_vs_ort_int8": ort_best / p50["ov_int8"],
            "ov_int8_vs_ov_fp": p50["ov_fp"] / p50["ov_int8"],
            "ov_int8_vs_ort_fp32": p50["ort_fp32"] / p50["ov_int8"],
            "f32_hint_cost": p50["ov_int8"] / p50["ov_int8_default_precision"]}


def print_results(res: dict, threads: int) -> bool:
    print(f"\nResNet-18 224x224, batch 1, {threads} threads (p50 / p90 ms per image)")
    for k, s in res["stats"].items():
        print(f"  {k:28s} {s.p50_ms:8.3f} {s.p90_ms:8.3f}")
    ok = True
    for key, want in TARGETS.items():
        got = res[key]
        ok &= got >= want
        print(f"  {key:28s} {got:6.2f}x  (target >= {want}x: {'PASS' if got >= want else 'FAIL'})")
    print(f"  {'ov_int8_vs_ort_fp32':28s} {res['ov_int8_vs_ort_fp32']:6.2f}x")
    print(f"  {'f32 hint time / default':28s} {res['f32_hint_cost']:6.2f}  (INT8 IR, f32 vs OpenVINO's default)")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=300, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args(argv)
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("OpenVINO is not installed: pip install 'qexport[openvino]'", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="qexport-ovbench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        built = prepare(work, args.threads)
        res = time_engines(built, args.threads, args.iters)
    return 0 if print_results(res, args.threads) else 1


if __name__ == "__main__":
    sys.exit(main())
