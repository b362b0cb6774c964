"""Runtime backends on real (tiny) ONNX files: build, load, infer, engine.json checks, latency statistics."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from qexport.errors import MissingDependencyError, QexportError
from qexport.runtimes import get_runtime, list_runtimes, load_engine, read_engine_meta, register_runtime
from qexport.runtimes.base import Runtime
from qexport.runtimes.onnxrt import session_for
from qexport.latency import LatencyStats, interleaved_compare, measure, stats_from_durations

C, H, W = 3, 8, 8
OUT_SCALE = 0.05


# ---------------------------------------------------------------- fixtures: real ONNX files
@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory) -> Path:
    """A tiny conv net exported by torch (opset 17, dynamic batch)."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(C, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            y = torch.relu(self.c1(x))
            y = torch.relu(self.c2(y)) + y
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("onnx") / "tiny.fp32.onnx"
    torch.onnx.export(Tiny().eval(), (torch.randn(1, C, H, W),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


@pytest.fixture(scope="module")
def qdq_onnx(tmp_path_factory) -> Path:
    """A hand-made QDQ graph: uint8 Q/DQ on the input, int8 per-channel DQ weights, Conv, Relu, and the uint8 Q/DQ
    a following layer would put on its input (which lets ONNX Runtime fuse QLinearConv)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    oc = 4
    # 7-bit weights: no int16 pair of uint8 x int8 products saturates on x86 CPUs without VNNI, so these runtime
    # tests compare the fused kernels with float on any x86 (the saturation: test_pair_saturation.py)
    w_q = rng.integers(-63, 64, size=(oc, C, 3, 3), dtype=np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
        numpy_helper.from_array(w_q, "w_q"),
        numpy_helper.from_array((rng.random(oc) * 0.01 + 0.001).astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(oc, np.int8), "w_zp"),
        numpy_helper.from_array(rng.standard_normal(oc).astype(np.float32) * 0.1, "bias"),
        numpy_helper.from_array(np.array(OUT_SCALE, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "y_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["input", "x_scale", "x_zp"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq", "bias"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("QuantizeLinear", ["relu", "y_scale", "y_zp"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "qdq_conv",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", C, H, W])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", oc, H, W])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"qexport.kind": "int8", "qexport.target": "onnxruntime"})
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("onnx") / "conv.qdq.onnx"
    onnx.save(model, str(path))
    return path


def _x(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, C, H, W), dtype=np.float32)


@pytest.fixture(scope="module")
def ort_engine(tmp_path_factory, qdq_onnx, fp32_onnx) -> Path:
    out = tmp_path_factory.mktemp("eng") / "ort"
    return get_runtime("onnxruntime").build_engine(qdq_onnx, out, fp32_onnx=fp32_onnx, threads=1)


# ---------------------------------------------------------------- registry
def test_registry_lists_builtins_and_rejects_unknown():
    assert {"onnxruntime", "openvino", "tensorrt"} <= set(list_runtimes())
    with pytest.raises(QexportError, match="unknown runtime 'nope'.*onnxruntime"):
        get_runtime("nope")


def test_register_runtime_decorator(monkeypatch):
    import qexport.runtimes as runtimes

    monkeypatch.setattr(runtimes, "_REGISTRY", dict(runtimes._REGISTRY))  # the dummy leaves with the test

    @register_runtime("test-dummy")
    class Dummy(Runtime):
        def build_engine(self, *a, **k):
            raise NotImplementedError

        def load_engine(self, *a, **k):
            raise NotImplementedError

    assert "test-dummy" in list_runtimes() and isinstance(get_runtime("test-dummy"), Dummy)
    with pytest.raises(ValueError, match="already registered"):
        register_runtime("test-dummy")(type("Other", (Dummy,), {}))


# ---------------------------------------------------------------- onnxruntime
def test_ort_engine_matches_source_sessions(ort_engine, qdq_onnx, fp32_onnx):
    meta = read_engine_meta(ort_engine)
    assert meta["target"] == "onnxruntime" and meta["threads"] == 1
    assert meta["models"] == {"int8": "int8.onnx", "fp32": "fp32.onnx"}
    assert meta["input"] == {"name": "input", "shape": ["N", C, H, W], "dtype": "float32"}
    assert meta["versions"]["onnxruntime"] and meta["versions"]["qexport"]
    assert len(meta["source_onnx_sha256"]) == 64 and meta["optimization"]["opt_level"] == "extended"
    assert meta["source_metadata"] == {"qexport.kind": "int8", "qexport.target": "onnxruntime"}
    assert meta["io"]["fp32"] == {"input": "input", "output": "logits"}
    for which, src in (("int8", qdq_onnx), ("fp32", fp32_onnx)):
        runner = load_engine(ort_engine, which=which)
        assert runner.threads == 1 and runner.which == which
        ref = session_for(src, threads=1, optimize=True)
        for n in (1, 7):  # dynamic batch
            x = _x(n)
            got = runner.infer(x)
            want = ref.run(None, {"input": x})[0]
            assert got.shape[0] == n
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ort_int8_close_to_op_by_op_reference(ort_engine, qdq_onnx):
    x = _x(4)
    ref = session_for(qdq_onnx, threads=1, optimize=False).run(None, {"input": x})[0]
    got = load_engine(ort_engine).infer(x)
    # fused integer kernels vs float op by op: at most one output quantization step apart
    assert np.abs(got - ref).max() <= OUT_SCALE * 1.001
    assert np.mean(got == ref) > 0.95


def test_ort_saved_model_is_fused(ort_engine):
    import onnx

    ops = {n.op_type for n in onnx.load(str(ort_engine / "int8.onnx")).graph.node}
    assert "QLinearConv" in ops and "Conv" not in ops and "Relu" not in ops


def test_ort_opt_level_all_and_threads_override(tmp_path, fp32_onnx):
    eng = get_runtime("onnxruntime").build_engine(fp32_onnx, tmp_path / "e", threads=2, opt_level="all")
    meta = read_engine_meta(eng)
    assert meta["optimization"]["load"] == "ORT_DISABLE_ALL" and meta["models"]["fp32"] is None
    runner = load_engine(eng, threads=1)
    assert runner.threads == 1
    x = _x(3)
    np.testing.assert_allclose(runner.infer(x), session_for(fp32_onnx, 1).run(None, {"input": x})[0],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(QexportError, match="no fp32 model"):
        load_engine(eng, which="fp32")
    with pytest.raises(QexportError, match="opt_level"):
        get_runtime("onnxruntime").build_engine(fp32_onnx, tmp_path / "f", opt_level="max")
    with pytest.raises(QexportError, match="unknown onnxruntime option"):
        get_runtime("onnxruntime").build_engine(fp32_onnx, tmp_path / "f", fancy=True)
    assert not (tmp_path / "f").exists()


def test_infer_input_checks(ort_engine):
    runner = load_engine(ort_engine)
    assert runner.input_shape == ("N", C, H, W)
    for bad, msg in [(_x(2).astype(np.float64), "float32"), (_x(2)[0], "rank 4"),
                     (np.zeros((2, C, H + 1, W), np.float32), "dim 2"), (np.zeros((2, 1, H, W), np.float32), "dim 1"),
                     (np.zeros((0, C, H, W), np.float32), "empty"), ([[1.0]], "numpy array")]:
        with pytest.raises(QexportError, match=msg):
            runner.infer(bad)
    with pytest.raises(QexportError, match="rank 4"):
        runner.infer(np.zeros((2, C, H, W, 1), np.float32))
    out = runner.infer(np.asfortranarray(_x(2)))  # non-contiguous input is accepted
    assert out.shape == (2, 4, H, W)


def test_benchmark_returns_stats(ort_engine):
    stats = load_engine(ort_engine).benchmark(batch_size=3, warmup=1, iters=3)
    assert isinstance(stats, LatencyStats) and stats.batch_size == 3 and stats.iters == 3
    assert 0 < stats.p50_ms <= stats.p99_ms and stats.throughput_ips > 0


# ---------------------------------------------------------------- engine.json errors and atomic output
def _edit_meta(engine: Path, **changes) -> None:
    p = engine / "engine.json"
    meta = json.loads(p.read_text())
    meta.update(changes)
    p.write_text(json.dumps(meta))


@pytest.mark.parametrize("case, msg", [
    ("missing_dir", "not found"),
    ("no_json", "no engine.json"),
    ("bad_json", "not valid JSON"),
    ("other_format", "not a qexport engine"),
    ("version", "format version 2"),
    ("target", "runtime 'warpdrive'"),
    ("artifact", "lacks its int8 artifact"),
])
def test_engine_json_errors(tmp_path, qdq_onnx, case, msg):
    eng = get_runtime("onnxruntime").build_engine(qdq_onnx, tmp_path / "eng", threads=1)
    if case == "missing_dir":
        eng = tmp_path / "nothing"
    elif case == "no_json":
        (eng / "engine.json").unlink()
    elif case == "bad_json":
        (eng / "engine.json").write_text("{")
    elif case == "other_format":
        _edit_meta(eng, format="something-else")
    elif case == "version":
        _edit_meta(eng, version=2)
    elif case == "target":
        _edit_meta(eng, target="warpdrive")
    elif case == "artifact":
        (eng / "int8.onnx").unlink()
    with pytest.raises(QexportError, match=msg) as err:
        load_engine(eng)
    text = str(err.value)
    assert "\n" not in text and "qexport build-engine" in text


def test_backend_refuses_engine_of_other_target(ort_engine):
    with pytest.raises(QexportError, match="engine for 'onnxruntime', not 'openvino'"):
        read_engine_meta(ort_engine, target="openvino")


def test_existing_output_refused_without_force(tmp_path, qdq_onnx):
    out = tmp_path / "eng"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(QexportError, match="already exists"):
        get_runtime("onnxruntime").build_engine(qdq_onnx, out, threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    get_runtime("onnxruntime").build_engine(qdq_onnx, out, threads=1, force=True)
    assert (out / "engine.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]  # no temporary leftovers


def test_missing_or_bad_source(tmp_path, qdq_onnx, fp32_onnx):
    ort = get_runtime("onnxruntime")
    with pytest.raises(QexportError, match="not found"):
        ort.build_engine(tmp_path / "none.onnx", tmp_path / "e")
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(QexportError, match="cannot read ONNX"):
        ort.build_engine(tmp_path / "junk.onnx", tmp_path / "e")
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------- openvino
def test_openvino_build_load_infer_and_cached_reload(tmp_path, qdq_onnx, fp32_onnx):
    pytest.importorskip("openvino")
    ov = get_runtime("openvino")
    eng = ov.build_engine(qdq_onnx, tmp_path / "ov", fp32_onnx=fp32_onnx, threads=1, precision="f32")
    meta = read_engine_meta(eng)
    assert meta["models"] == {"int8": "int8.xml", "fp32": "fp32.xml"}
    assert meta["properties"] == {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": "cache",
                                  "INFERENCE_PRECISION_HINT": "f32"}
    assert meta["compiled_properties"]["int8"]["INFERENCE_PRECISION_HINT"] == "<Type: 'float32'>"
    assert (eng / "int8.bin").is_file() and any((eng / "cache").iterdir())
    for which, src in (("int8", qdq_onnx), ("fp32", fp32_onnx)):
        runner = load_engine(eng, which=which)
        assert runner.loaded_from_cache, "the compiled blob cached at build time must be reused after the rename"
        ref = session_for(src, threads=1, optimize=False)
        for n in (1, 7):
            x = _x(n)
            want = ref.run(None, {"input": x})[0]
            got = runner.infer(x)
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 0.05 * max(1.0, np.abs(want).max())
    two = load_engine(eng, threads=2)  # the thread count is not part of OpenVINO's cache key
    usable = min(2, len(os.sched_getaffinity(0)))  # OpenVINO caps the threads at the CPUs this process may use
    assert two.threads == 2 and int(two.compiled.get_property("INFERENCE_NUM_THREADS")) == usable


def test_openvino_default_precision_recorded(tmp_path, qdq_onnx, fp32_onnx):
    pytest.importorskip("openvino")
    eng = get_runtime("openvino").build_engine(qdq_onnx, tmp_path / "ov", fp32_onnx=fp32_onnx, threads=1)
    meta = read_engine_meta(eng)
    # INT8: f32 float glue by default (the parity setting, docs/openvino.md); FP baseline: OpenVINO's own default
    assert meta["properties"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert "INFERENCE_PRECISION_HINT" not in meta["model_properties"]["fp32"]
    assert meta["compiled_properties"]["int8"]["INFERENCE_PRECISION_HINT"] == "<Type: 'float32'>"
    assert meta["compiled_properties"]["fp32"]["INFERENCE_PRECISION_HINT"]
    assert meta["runtime_precisions"]["int8"]
    with pytest.raises(QexportError, match="precision"):
        get_runtime("openvino").build_engine(qdq_onnx, tmp_path / "x", precision="int4")


def test_openvino_missing_is_one_line(monkeypatch, tmp_path, qdq_onnx):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'qexport\[openvino\]'"):
        get_runtime("openvino").build_engine(qdq_onnx, tmp_path / "ov")
    assert not (tmp_path / "ov").exists()


# ---------------------------------------------------------------- tensorrt
def test_tensorrt_missing_gives_install_hint(tmp_path, qdq_onnx, ort_engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    trt = get_runtime("tensorrt")
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed: pip install tensorrt") as err:
        trt.build_engine(qdq_onnx, tmp_path / "trt")
    assert "NVIDIA GPU" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "trt").exists()
    fake = tmp_path / "fake_trt_engine"
    fake.mkdir()
    meta = json.loads((ort_engine / "engine.json").read_text())
    meta.update(target="tensorrt", models={"int8": "int8.plan", "fp32": None})
    (fake / "engine.json").write_text(json.dumps(meta))
    (fake / "int8.plan").write_bytes(b"plan")
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed"):
        load_engine(fake)


def test_tensorrt_without_gpu(monkeypatch, tmp_path, qdq_onnx):
    import torch
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="needs an NVIDIA GPU"):
        get_runtime("tensorrt").build_engine(qdq_onnx, tmp_path / "trt")


@pytest.mark.tensorrt
def test_tensorrt_build_load_infer(tmp_path, fp32_onnx):
    """Needs TensorRT and a GPU: a TensorRT-form QDQ file would come from the exporter; FP32 is enough here."""
    trt_rt = get_runtime("tensorrt")
    eng = trt_rt.build_engine(fp32_onnx, tmp_path / "trt", fp32_onnx=fp32_onnx, max_batch=8)
    meta = read_engine_meta(eng)
    assert meta["profiles"]["int8"]["max"][0] == 8 and (eng / "timing.cache").stat().st_size > 0
    ref = session_for(fp32_onnx, 1, optimize=False)
    for which in ("int8", "fp32"):
        runner = load_engine(eng, which=which)
        for n in (1, 7):
            x = _x(n)
            np.testing.assert_allclose(runner.infer(x), ref.run(None, {"input": x})[0], rtol=1e-2, atol=1e-2)
        with pytest.raises(QexportError, match="exceeds"):
            runner.infer(_x(9))
        assert runner.benchmark(2, warmup=2, iters=5).iters == 5
    trt_rt.build_engine(fp32_onnx, eng, force=True, max_batch=8)  # reuses the saved timing cache


# ---------------------------------------------------------------- latency statistics (fake clock, no sleeping)
def _fake_clock(durations):
    """A clock whose consecutive (start, stop) reads are ``durations`` apart, with 1 s gaps between calls."""
    reads, t = [], 100.0
    for d in durations:
        reads += [t, t + d]
        t += d + 1.0
    it = iter(reads)
    return lambda: next(it)


def test_measure_percentiles_from_injected_clock():
    durations = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    calls = []
    stats = measure(lambda: calls.append(1), warmup=3, iters=100, batch_size=4, clock=_fake_clock(durations))
    assert len(calls) == 103 and stats.iters == 100 and stats.batch_size == 4
    assert stats.p50_ms == pytest.approx(50.5) and stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01) and stats.mean_ms == pytest.approx(50.5)
    assert stats.throughput_ips == pytest.approx(4 / 0.0505)
    assert stats.to_dict() == {"batch_size": 4, "p50_ms": stats.p50_ms, "p90_ms": stats.p90_ms,
                               "p99_ms": stats.p99_ms, "mean_ms": stats.mean_ms,
                               "throughput_ips": stats.throughput_ips, "iters": 100}


def test_measure_min_time_extends_iterations():
    stats = measure(lambda: None, warmup=0, iters=2, min_time_s=0.35, clock=_fake_clock([0.1] * 10))
    assert stats.iters == 4 and stats.p50_ms == pytest.approx(100.0)


def test_interleaved_compare_round_robin():
    order = []
    runners = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    # per timed call the clock advances: a -> 2 ms, b -> 1 ms (a's calls are odd-numbered in round 0, ...)
    stats = interleaved_compare(runners, rounds=3, warmup=1, settle=0,
                                clock=_fake_clock([0.002, 0.001, 0.001, 0.002, 0.002, 0.001]),
                                batch_size={"a": 1, "b": 2})
    seq = order[2:]
    assert order[:2] == ["a", "b"] and seq == ["a", "b", "b", "a", "a", "b"]
    assert stats["a"].p50_ms == pytest.approx(2.0) and stats["b"].p50_ms == pytest.approx(1.0)
    assert stats["b"].throughput_ips == pytest.approx(2000.0) and stats["a"].iters == 3


def test_interleaved_compare_settles_each_turn_untimed():
    order = []
    runners = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    # the clock is read only around timed calls: 2 rounds x 2 runners x 1 timed call = 4 durations
    stats = interleaved_compare(runners, rounds=2, warmup=0, settle=2, clock=_fake_clock([0.003, 0.001, 0.001, 0.003]))
    assert order == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    assert stats["a"].iters == 2 and stats["a"].p50_ms == pytest.approx(3.0)
    with pytest.raises(ValueError, match="settle"):
        interleaved_compare(runners, rounds=1, settle=-1)


def test_stats_validation():
    with pytest.raises(ValueError):
        stats_from_durations([], 1)
    with pytest.raises(ValueError):
        measure(lambda: None, iters=0)
