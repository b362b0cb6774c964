"""The TensorRT target without TensorRT: the checker on real exports, op-by-op parity of the tensorrt-encoded file,
the CLI's missing-TensorRT error paths, and (on a CUDA machine) the runner's CUDA buffer plumbing with a fake
TensorRT module. Tests that need the real TensorRT are marked ``tensorrt`` and skipped by default.

The exports are real: ``qexport.calibrate.calibrate`` (minmax on a few random images, random weights where no
checkpoint exists) followed by ``export_recipe`` (the exporter's own pre-write check is turned off here, so that
the checker is what is being tested on every file the exporter writes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from qexport.export.check import check_model
from qexport.export.qdq import export_recipe
from qexport.calibrate import CalibrateConfig, calibrate

# model spec -> (input size override, image size of the calibration PNGs); small inputs keep this file fast:
# the checker's rules do not depend on spatial size.
MODELS = {"cifar:resnet20": (None, 32), "torchvision:resnet18": ((32, 32), 32),
          "torchvision:mobilenet_v2": ((32, 32), 32)}
_SLOW_MODELS = {"cifar:resnet32": (None, 32)}


def _write_pngs(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trt_target")


@pytest.fixture(scope="module")
def exporter(workdir):
    """exporter(spec, bits, target) -> the QDQ file the exporter wrote (cached per module)."""
    cache: dict = {}

    def make(spec: str, bits: str, target: str) -> Path:
        key = (spec, bits, target)
        if key not in cache:
            size, px = {**MODELS, **_SLOW_MODELS}[spec]
            imgs = workdir / f"imgs{px}"
            if not imgs.is_dir():
                _write_pngs(imgs, 4, px)
            out = workdir / "_".join(k.replace(":", "-") for k in key)
            recipe = calibrate(CalibrateConfig(model=spec, output=out / "recipe", method="minmax", bits=bits,
                                               target=target, data=str(imgs), num_samples=4, quiet=True,
                                               device="cpu", input_size=size))
            qdq, fp32, _ = export_recipe(recipe, target, out / "model.onnx", check=False)
            assert fp32.is_file()
            cache[key] = qdq
        return cache[key]

    return make


def _matrix():
    """tensorrt for every model and width (the issue's acceptance); onnxruntime for ResNet-20 W8A8 by default,
    the other onnxruntime files and ResNet-32 under ``-m slow`` (the default suite's time budget)."""
    out = []
    for spec in list(MODELS) + list(_SLOW_MODELS):
        for bits in ("w8a8", "w4a4"):
            for target in ("tensorrt", "onnxruntime"):
                slow = spec in _SLOW_MODELS or (target == "onnxruntime" and (spec, bits) != ("cifar:resnet20", "w8a8"))
                out.append(pytest.param(spec, bits, target, marks=[pytest.mark.slow] if slow else [],
                                        id=f"{spec}-{bits}-{target}"))
    return out


@pytest.mark.parametrize("spec,bits,target", _matrix())
def test_checker_passes_every_export(exporter, spec, bits, target):
    import onnx

    path = exporter(spec, bits, target)
    assert check_model(path, target) == [], f"{path} breaks the {target} rules"
    m = onnx.load(str(path))
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["qexport.target"] == target and meta["qexport.bits"] == bits
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert qs, "no activation was quantized"
    if target == "tensorrt":  # the encoding itself: int8 everywhere, zero point 0, float bias, Clip below 8 bits
        inits = {t.name: t for t in m.graph.initializer}
        from onnx import TensorProto, numpy_helper

        for n in m.graph.node:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
                zp = inits[n.input[2]]
                assert zp.data_type == TensorProto.INT8 and not numpy_helper.to_array(zp).any(), n.name
        assert not any(t.data_type == TensorProto.INT32 for t in m.graph.initializer), "int32 bias in a TRT file"
        clips = [n for n in m.graph.node if n.op_type == "Clip" and n.output[0].endswith(".clipped")]
        assert (len(clips) > 0) == (bits == "w4a4")  # the exporter's sub-8-bit Clips (not a model's ReLU6)


# ------------------------------------------------------------------ ResNet-20 (shared checkpoint): parity
@pytest.fixture(scope="module")
def r20_trt_minmax(workdir, r20_weights, cifar_train) -> tuple[Path, Path]:
    """(recipe folder, tensorrt QDQ file) of the pretrained ResNet-20, W8A8 minmax calibrated --target tensorrt."""
    out = workdir / "r20_pretrained"
    recipe = calibrate(CalibrateConfig(model="cifar:resnet20", output=out / "recipe", method="minmax",
                                       bits="w8a8", target="tensorrt", weights=str(r20_weights), data=str(cifar_train),
                                       num_samples=128, quiet=True, device="cpu"))
    qdq, _, _ = export_recipe(recipe, "tensorrt", out / "model.onnx")  # with the exporter's own check
    return recipe, qdq


def test_resnet20_tensorrt_file_op_by_op_agrees_with_quantsim(r20_trt_minmax, cifar_test):
    from qexport.data import ImageFolder, iter_batches, subset_indices
    from qexport.models import Preprocess
    from qexport.recipe import QuantRecipe
    from qexport.runtimes.onnxrt import session_for

    recipe_dir, qdq = r20_trt_minmax
    assert check_model(qdq, "tensorrt") == []
    recipe = QuantRecipe.load(recipe_dir)
    sim = recipe.build_quantsim().eval()
    sess = session_for(qdq, threads=2, optimize=False)  # every node as written: what TensorRT is asked to compute
    ds = ImageFolder(cifar_test, Preprocess.from_dict(recipe.model.preprocess))
    idx = subset_indices(len(ds), 1000, seed=0)
    agree = total = correct_sim = 0
    max_diff = 0.0
    with torch.no_grad():
        for x, y in iter_batches(ds, 250, idx):
            a = sim(x).numpy()
            b = sess.run(None, {"input": x.numpy()})[0]
            agree += int((a.argmax(1) == b.argmax(1)).sum())
            correct_sim += int((a.argmax(1) == y.numpy()).sum())
            total += len(y)
            max_diff = max(max_diff, float(np.abs(a - b).max()))
    assert total == 1000
    assert agree / total >= 0.999, f"top-1 agreement {100 * agree / total:.2f} % (max |logit diff| {max_diff:.4g})"
    assert correct_sim / total > 0.7  # a real model on real images (FP32 is 81 %)


# ------------------------------------------------------------------ CLI error paths without TensorRT
def _cli(args: list[str], cwd: Path, hide_tensorrt: bool = True) -> subprocess.CompletedProcess:
    """Run ``qexport ARGS`` in a subprocess; with ``hide_tensorrt`` a shadow ``tensorrt`` package on PYTHONPATH
    makes ``import tensorrt`` fail as it does where TensorRT is not installed (also on machines that have it)."""
    env = dict(os.environ)
    if hide_tensorrt:
        shadow = cwd / "_no_tensorrt"
        (shadow / "tensorrt").mkdir(parents=True, exist_ok=True)
        (shadow / "tensorrt" / "__init__.py").write_text("raise ImportError('No module named tensorrt')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(shadow), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "qexport.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          check=False,
                          timeout=300)


def _assert_missing_trt(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in proc.stderr
    assert "TensorRT is not installed" in line and "pip install tensorrt" in line
    assert "NVIDIA" in line  # says where the instructions are and what else it needs


def test_build_engine_without_tensorrt_exits_2_one_line(exporter, tmp_path):
    qdq = exporter("cifar:resnet20", "w8a8", "tensorrt")
    proc = _cli(["build-engine", str(qdq), "--target", "tensorrt", "-o", str(tmp_path / "eng")], tmp_path)
    _assert_missing_trt(proc)
    assert not (tmp_path / "eng").exists()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("_no_tensorrt",)], "something was written"


def _fake_trt_engine_folder(folder: Path, source_onnx: Path | None = None) -> Path:
    """A minimal hand-written tensorrt engine folder (engine.json + a placeholder plan)."""
    folder.mkdir()
    meta = {"format": "qexport-engine", "version": 1, "target": "tensorrt",
            "models": {"int8": "int8.plan", "fp32": None},
            "input": {"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32"},
            "output": {"name": "logits", "shape": ["batch", 10], "dtype": "float32"},
            "threads": 1, "versions": {"tensorrt": "10.0.0", "qexport": "0.1.0"},
            "gpu": {"name": "NVIDIA H200", "compute_capability": "9.0"},
            "profiles": {"int8": {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [64, 3, 32, 32]}}}
    (folder / "engine.json").write_text(json.dumps(meta))
    (folder / "int8.plan").write_bytes(b"not a real plan")
    return folder


def test_verify_tensorrt_engine_without_tensorrt_exits_2_one_line(exporter, workdir, tmp_path):
    qdq = exporter("cifar:resnet20", "w8a8", "tensorrt")
    recipe = qdq.parent / "recipe"
    eng = _fake_trt_engine_folder(tmp_path / "eng")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = _cli(["verify", str(eng), "--recipe", str(recipe), "--data", str(workdir / "imgs32"), "-q"], tmp_path)
    _assert_missing_trt(proc)
    after = sorted(p.name for p in tmp_path.iterdir() if p.name != "_no_tensorrt")
    assert after == before and not (tmp_path / "eng.report").exists()
    assert sorted(p.name for p in eng.iterdir()) == ["engine.json", "int8.plan"]


# ------------------------------------------------------------------ runner plumbing with a fake TensorRT (GPU)
class _CudaArray:
    """A raw device pointer seen as a torch tensor (``__cuda_array_interface__``, no copy)."""

    def __init__(self, ptr: int, shape: tuple, typestr: str = "<f4"):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (int(ptr), False),
                                         "version": 3, "strides": None}


def _fake_tensorrt(weight: torch.Tensor) -> types.ModuleType:
    """A tiny stand-in for the ``tensorrt`` module whose engine computes ``mean_hw(x) @ weight`` on the device
    addresses the runner binds, on the CUDA stream it passes: it exercises the runner's buffers, shapes, stream
    and copies exactly as TensorRT would use them."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.0.0-fake"
    for i, name in enumerate(("float32", "float16", "int32", "int8", "bool", "bfloat16")):
        setattr(trt, name, f"dtype:{name}")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Context:
        def __init__(self):
            self.shapes, self.addr, self.calls = {}, {}, 0

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)

        def set_tensor_address(self, name, ptr):
            self.addr[name] = int(ptr)

        def get_tensor_shape(self, name):
            assert name == "logits"
            return (self.shapes["input"][0], weight.shape[1])

        def execute_async_v3(self, stream_handle):
            n, c, h, w = self.shapes["input"]
            with torch.cuda.stream(torch.cuda.ExternalStream(stream_handle)):
                x = torch.as_tensor(_CudaArray(self.addr["input"], (n, c, h, w)), device="cuda")
                y = torch.as_tensor(_CudaArray(self.addr["logits"], (n, weight.shape[1])), device="cuda")
                y.copy_(x.mean(dim=(2, 3)) @ weight)
            self.calls += 1
            return True

    class Engine:
        num_io_tensors = 2
        names = ("input", "logits")

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return "INPUT" if name == "input" else "OUTPUT"

        def get_tensor_dtype(self, name):
            return trt.float32

        def create_execution_context(self):
            self.context = Context()
            return self.context

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, blob):
            return Engine() if blob == b"not a real plan" else None

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda)")
def test_tensorrt_runner_cuda_plumbing_with_fake_engine(tmp_path, monkeypatch):
    from qexport.runtimes import load_engine
    from qexport.runtimes import trt as trt_backend

    weight = torch.randn(3, 10, device="cuda")
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(weight))
    monkeypatch.setattr(trt_backend, "_LOGGER", None)
    eng = _fake_trt_engine_folder(tmp_path / "eng")
    meta = json.loads((eng / "engine.json").read_text())
    meta["versions"]["tensorrt"] = "10.0.0-fake"
    meta["gpu"]["name"] = torch.cuda.get_device_name(0)
    (eng / "engine.json").write_text(json.dumps(meta))
    runner = load_engine(eng, "int8")
    assert type(runner).__name__ == "TensorRTRunner"
    for n in (1, 5, 64):
        x = np.random.default_rng(n).standard_normal((n, 3, 32, 32), dtype=np.float32)
        got = runner.infer(x)
        want = (torch.from_numpy(x).mean(dim=(2, 3)) @ weight.cpu()).numpy()
        assert got.shape == (n, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    from qexport.errors import QexportError

    with pytest.raises(QexportError, match="exceeds"):
        runner.infer(np.zeros((65, 3, 32, 32), np.float32))
    calls = runner.engine.context.calls
    stats = runner.benchmark(4, warmup=2, iters=7)
    assert stats.iters == 7 and stats.p50_ms > 0 and runner.engine.context.calls == calls + 9
    call = runner.timed_call(2)
    call()
    assert runner.engine.context.shapes["input"] == (2, 3, 32, 32)
    # another TensorRT version or GPU: refused with a rebuild hint
    meta["gpu"]["name"] = "some other GPU"
    (eng / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(QexportError, match="rebuild it here"):
        load_engine(eng, "int8")


# ------------------------------------------------------------------ real TensorRT (skipped by default)
@pytest.mark.tensorrt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="needs TensorRT 10 and an NVIDIA GPU (see docs/tensorrt.md)")
def test_tensorrt_engine_of_resnet20_agrees_with_quantsim(r20_trt_minmax, cifar_test, tmp_path):
    """Needs TensorRT 10 and an NVIDIA GPU; has never run in this project's CI."""
    from qexport.build_engine import build_engine_folder
    from qexport.verify.compare import VerifyConfig, verify

    recipe, qdq = r20_trt_minmax
    eng = build_engine_folder(qdq, tmp_path / "eng", "tensorrt")
    rep, _ = verify(VerifyConfig(engine=eng, recipe=recipe, data=cifar_test, num_samples=1000, quiet=True,
                                 bench_batch_sizes=(1, 64), bench_iters=20, min_agreement=99.5))
    assert rep["passed"], rep["accuracy"]
