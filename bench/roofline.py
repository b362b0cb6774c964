"""Engine speed against this CPU's practical GEMM peak, with ONNX Runtime's own kernels (issue 12).

1. Peaks: ONNX Runtime ``MatMulInteger`` (uint8 activations x int8 constant weights -> int32, the u8s8 kernels
   QLinearConv runs on) and ``MatMul`` (fp32), ``--threads`` intra-op threads, on im2col GEMM shapes of
   3x3 convolutions (``GEMM_SHAPES``); the peak of each is the best GMAC/s over the shapes (p50 of the timed
   calls of each shape, int8 and fp32 interleaved).
2. Engines: FP32 and qexport's onnxruntime engines (``--bits``) of ResNet-18 (224x224, random weights) and
   ResNet-20 (CIFAR, shared checkpoint), built as bench/engine_speed.py builds them, timed interleaved at batch 1
   and at a throughput batch. Peaks and fractions use the median (p50) time of each call; on a heavily shared
   machine a long call (fp32 GEMM, ResNet-18) takes more of other processes' time slices than a short one, so
   the figures are only as good as the machine is quiet (the load average is printed). The multiply-accumulates of the convolutions and the classifier are counted from
   the FP32 ONNX file (shape inference); each engine's *fraction of peak* is the time those MACs would take at
   its kind's peak (int8 for INT8 engines, fp32 for FP32) divided by its measured p50 latency. 100 % would be
   every layer running at the best GEMM rate of this CPU and nothing else costing time.

    python bench/roofline.py                         # both models, w8a8 and w4a4, 2 threads
    python bench/roofline.py --models resnet20 --bits w8a8,w4a4,w3a3 --iters 100
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_speed import MODELS, _cpu_name, _log, interleaved_p50_min, prepare  # noqa: E402

# (M, K, N): im2col GEMMs (output pixels, Cin*9, Cout) of 3x3 convs, ~29 MMAC each (well under a millisecond
# at fp32 on a quiet core pair): on a shared machine long calls are preempted far more often than short ones,
# so all shapes are kept short (ResNet-18's full-size layers, 115 MMAC, ran at 1/20 the fp32 speed at load 22).
GEMM_SHAPES = ((784, 576, 64), (196, 1152, 128), (49, 2304, 256), (256, 1152, 96), (1024, 144, 192))
THROUGHPUT_BATCH = {"resnet18": 8, "resnet20": 64}


def _gemm_model(m: int, k: int, n: int, integer: bool):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if integer:
        w = numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "B")
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a_t, y_t = TensorProto.UINT8, TensorProto.INT32
    else:
        w = numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_t, y_t = TensorProto.FLOAT, TensorProto.FLOAT
    g = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("A", a_t, [m, k])],
                          [helper.make_tensor_value_info("Y", y_t, [m, n])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def gemm_peaks(threads: int, seconds: float) -> dict:
    """GMAC/s of MatMulInteger u8s8 and MatMul fp32 per shape (p50 of the timed calls), and the best of each.

    Returns:
        {"shapes": [(shape, int8 GMAC/s, fp32 GMAC/s)], "int8": peak, "fp32": peak}.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # interleaved: see load_engine's docstring
    rows = []
    for m, k, n in GEMM_SHAPES:
        rng = np.random.default_rng(1)
        a8 = rng.integers(0, 256, (m, k)).astype(np.uint8)
        a32 = rng.normal(size=(m, k)).astype(np.float32)
        s8 = ort.InferenceSession(_gemm_model(m, k, n, True).SerializeToString(), so, providers=["CPUExecutionProvider"])
        s32 = ort.InferenceSession(_gemm_model(m, k, n, False).SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
        calls = {"int8": lambda: s8.run(None, {"A": a8}), "fp32": lambda: s32.run(None, {"A": a32})}
        t0 = time.perf_counter()
        calls["fp32"]()
        rounds = int(min(200, max(5, seconds / max(time.perf_counter() - t0, 1e-4) / 1.3)))
        t = interleaved_p50_min(calls, rounds, warmup=3)
        macs = m * k * n
        rows.append(((m, k, n), macs / t["int8"][0] / 1e6, macs / t["fp32"][0] / 1e6))
        _log(f"GEMM {m}x{k}x{n}: int8 {rows[-1][1]:.0f} GMAC/s, fp32 {rows[-1][2]:.0f} GMAC/s (p50 of {rounds})")
    return {"shapes": rows, "int8": max(r[1] for r in rows), "fp32": max(r[2] for r in rows)}


def count_macs(onnx_path: Path) -> int:
    """Multiply-accumulates of the Conv, Gemm and MatMul nodes of a float ONNX file at batch 1."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    for d in m.graph.input[0].type.tensor_type.shape.dim[:1]:
        d.dim_value = 1
    m = onnx.shape_inference.infer_shapes(m)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(m.graph.value_info) + list(m.graph.output)}
    weights = {t.name: numpy_helper.to_array(t).shape for t in m.graph.initializer}
    total = 0
    for node in m.graph.node:
        if node.op_type == "Conv":
            w, out = weights[node.input[1]], shapes[node.output[0]]
            total += int(np.prod(out[1:])) * int(np.prod(w[1:]))  # batch 1 (inference may lose the dim)
        elif node.op_type in ("Gemm", "MatMul"):
            w, out = weights[node.input[1]], shapes[node.output[0]]
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            k = w[1] if (node.op_type == "Gemm" and trans_b) else w[0]
            total += int(np.prod(out[1:])) * int(k)
    return total


def time_engines(name: str, built: dict, threads: int, iters: int) -> dict:
    """batch -> engine -> (p50 ms, min ms), FP32 and each qexport engine interleaved, batch 1 and throughput batch."""
    from qexport.runtimes import load_engine

    first = next(iter(built["engines"].values()))
    runners = {"fp32": load_engine(first, "fp32", threads)}
    runners.update({b: load_engine(e, "int8", threads) for b, e in built["engines"].items()})
    out = {}
    for b in (1, THROUGHPUT_BATCH[name]):
        rounds = max(5, iters if b == 1 else iters // 8)
        _log(f"{name}: timing {len(runners)} engines interleaved, batch {b}, {rounds} rounds")
        out[b] = interleaved_p50_min({k: r.timed_call(b) for k, r in runners.items()}, rounds,
                                     warmup=5 if b == 1 else 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,resnet20", help="comma-separated: resnet18, resnet20")
    ap.add_argument("--bits", default="w8a8,w4a4", help="comma-separated qexport bit widths")
    ap.add_argument("--iters", type=int, default=100, help="interleaved rounds at batch 1 (throughput batch: /8)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads")
    ap.add_argument("--gemm-seconds", type=float, default=4.0, help="timing budget per GEMM shape")
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bits = tuple(b.strip() for b in args.bits.split(",") if b.strip())
    bad = [m for m in models if m not in MODELS]
    if bad or not models or not bits:
        ap.error(f"--models/--bits: unknown {', '.join(bad) or '(none given)'}; models: {', '.join(MODELS)}")
    peaks = gemm_peaks(args.threads, args.gemm_seconds)
    results = {}
    with tempfile.TemporaryDirectory(prefix="qexport-roofline-") as tmp:
        for name in models:
            built = prepare(name, Path(tmp), args.threads, bits)
            if built is not None:
                results[name] = (count_macs(built["fp32"]), time_engines(name, built, args.threads, args.iters))
    print(f"\n== roofline ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {_cpu_name()}, load average "
          f"{os.getloadavg()[0]:.1f}, {args.threads} threads)")
    for (m, k, n), i8, f32 in peaks["shapes"]:
        print(f"GEMM {m}x{k}x{n}: MatMulInteger u8s8 {i8:.0f} GMAC/s, MatMul fp32 {f32:.0f} GMAC/s ({i8 / f32:.2f}x)")
    print(f"peaks: int8 {peaks['int8']:.0f} GMAC/s, fp32 {peaks['fp32']:.0f} GMAC/s "
          f"(ratio {peaks['int8'] / peaks['fp32']:.2f}x: the ceiling of any INT8-vs-FP32 speed-up here)")
    for name, (macs, per_batch) in results.items():
        print(f"{name}: {macs / 1e6:.1f} MMAC per image")
        for b, lat in per_batch.items():
            for k, (p50, best) in lat.items():
                peak = peaks["fp32" if k == "fp32" else "int8"]
                ideal = macs * b / peak / 1e6  # ms
                print(f"  batch {b:>3} {k:<5} p50 {p50:9.2f} ms  (best {best:9.2f} ms)  at peak {ideal:8.2f} ms  "
                      f"fraction of peak {100 * ideal / p50:5.1f} %  speed-up vs FP32 {lat['fp32'][0] / p50:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
