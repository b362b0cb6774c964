"""Shared fixtures: CLI runners (in-process and subprocess), tiny image folders, and recipes built once per session.

Recipes on the pretrained CIFAR-10 ResNet-20 need the shared folder (``../shared`` beside the repository or
``$QEXPORT_SHARED``); tests that use them are skipped with a reason when it is absent. Everything else runs on a
fresh machine: tiny factory models (``tests_support.models``) and random PNG folders written here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from qexport import shared

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:  # tests_support.models:<factory> model specs
    sys.path.insert(0, str(TESTS_DIR))

TINY = "tests_support.models:tiny_net"
CALIB_R20 = 512  # calibration images for the W8A8 ResNet-20 recipe
CALIB_SMALL = 128  # calibration images for the other ResNet-20 recipes
EVAL_N = 1000  # test-dev images in the parity checks


# ---------------------------------------------------------------- running the CLI
@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]


def subprocess_env() -> dict[str, str]:
    """Environment for ``qexport`` subprocesses: tests_support importable, few threads, no colour."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "120"
    return env


def run_qexport(args: list[str], cwd: Path | None = None, timeout: float = 600) -> CliResult:
    """Run the installed ``qexport`` console script (``python -m qexport.cli`` if it is not on PATH)."""
    script = shutil.which("qexport")
    exe = [script] if script else [sys.executable, "-m", "qexport.cli"]
    p = subprocess.run(exe + [str(a) for a in args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                       timeout=timeout)
    return CliResult(p.returncode, p.stdout, p.stderr)


class ConvGeometry:
    """The geometry u8s8_saturation.saturation_correction reads from a QuantConv2d (3x3 kernels, padding 1)."""

    def __init__(self, stride: int = 1):
        self.groups, self.padding, self.stride, self.dilation = 1, (1, 1), (stride, stride), (1, 1)


def run_in_fresh_process(test_file: Path, function: str, *args, timeout: float = 300
                         ) -> subprocess.CompletedProcess:
    """Call ``function(*args)`` of a test module in a new Python process (for tests that raise a real SIGINT:
    one raised late inside the long default-suite process once ended it with SIGSEGV). Arguments are passed as
    their ``repr``; the torch thread count is this process's, so the arithmetic is the same.

    Returns:
        The finished process (stdout, stderr, returncode).
    """
    import torch

    call = f"{function}({', '.join(repr(a) if not isinstance(a, Path) else f'pathlib.Path({str(a)!r})' for a in args)})"
    code = (f"import sys, pathlib; sys.path.insert(0, {str(test_file.parent)!r}); "
            f"import {test_file.stem} as t; t.{call}")
    env = {**subprocess_env(), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def sigint_at_step(cls, stop_at: int) -> dict[str, int]:
    """Make the ``stop_at``-th call of ``cls.step`` deliver a real SIGINT just before it steps (for a run in a
    fresh process, see run_in_fresh_process; the class stays patched in that process).

    Returns:
        Counters ``started`` and ``finished`` of the step calls, updated as the run goes.
    """
    import signal

    real, count = cls.step, {"started": 0, "finished": 0}

    def step(self, info=None):
        count["started"] += 1
        if count["started"] == stop_at:
            signal.raise_signal(signal.SIGINT)
        out = real(self, info)
        count["finished"] += 1
        return out

    cls.step = step
    return count


@pytest.fixture
def qx(capsys, monkeypatch):
    """Run ``qexport ARGS`` in this process through ``qexport.cli.main`` (the console entry point).

    Returns a function ``qx(*args) -> CliResult`` with the exit code and captured stdout/stderr.
    """
    from qexport.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["qexport", *[str(a) for a in args]])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run


def assert_user_error(res: CliResult, *fragments: str) -> None:
    """Exit code 2, exactly one line on stderr starting with ``error:``, naming each fragment; no traceback."""
    assert res.code == 2, f"exit code {res.code}, stderr: {res.err!r}"
    assert "Traceback" not in res.err
    assert len(res.err_lines) == 1, f"expected one stderr line, got: {res.err!r}"
    line = res.err_lines[0]
    assert line.startswith("error: "), line
    for frag in fragments:
        assert frag.lower() in line.lower(), f"{frag!r} not in {line!r}"


def tree(folder: Path) -> set[str]:
    """Every path under ``folder`` (hidden ones included), relative."""
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}


# ---------------------------------------------------------------- data on a fresh machine
def write_image_folder(root: Path, classes: int | tuple[str, ...], per_class: int, size: int = 16, seed: int = 0,
                       ext: str = ".png") -> Path:
    """Random RGB images in class subfolders (``c0``, ``c1``, ... or the given names), as PNG or JPEG."""
    from PIL import Image

    names = [f"c{c}" for c in range(classes)] if isinstance(classes, int) else list(classes)
    rng = np.random.default_rng(seed)
    for name in names:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i:03d}{ext}")
    return root


def write_png_folder(root: Path, classes: int, per_class: int, size: int = 16, seed: int = 0) -> Path:
    """Random RGB PNGs in class subfolders ``c0``, ``c1``, ...."""
    return write_image_folder(root, classes, per_class, size, seed)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """A labelled folder of 2 x 12 random 16x16 RGB PNGs (the input size of tests_support.models)."""
    return write_png_folder(tmp_path_factory.mktemp("tiny_images"), classes=2, per_class=12)


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory, tiny_images) -> Path:
    """A W8A8 minmax recipe of tests_support.models:tiny_net."""
    from qexport.calibrate import CalibrateConfig, calibrate

    out = tmp_path_factory.mktemp("tiny_recipe") / "recipe"
    return calibrate(CalibrateConfig(model=TINY, output=out, method="minmax", bits="w8a8", data=str(tiny_images),
                                     num_samples=24, quiet=True))


# ---------------------------------------------------------------- the shared folder (pretrained ResNet-20, CIFAR-10)
@pytest.fixture(scope="session")
def r20_weights() -> Path:
    p = shared.cifar_checkpoint(20)
    if p is None:
        pytest.skip("shared folder with models/cifar10/resnet20-*.th not found (../shared or $QEXPORT_SHARED)")
    return p


@pytest.fixture(scope="session")
def cifar_train() -> Path:
    p = shared.cifar_images("train")
    if p is None:
        pytest.skip("shared CIFAR-10 images (data/cifar10/train) not found (../shared or $QEXPORT_SHARED)")
    return p


@pytest.fixture(scope="session")
def cifar_test() -> Path:
    p = shared.cifar_images("test-dev")
    if p is None:
        pytest.skip("shared CIFAR-10 images (data/cifar10/test-dev) not found (../shared or $QEXPORT_SHARED)")
    return p


def _r20_recipe(tmp_path_factory, weights, data, bits: str, target: str, n: int) -> Path:
    from qexport.calibrate import CalibrateConfig, calibrate

    out = tmp_path_factory.mktemp(f"r20_{bits}_{target}") / "recipe"
    return calibrate(CalibrateConfig(model="cifar:resnet20", output=out, method="mse", bits=bits, target=target,
                                     weights=str(weights), data=str(data), num_samples=n, quiet=True))


@pytest.fixture(scope="session")
def r20_w8a8(tmp_path_factory, r20_weights, cifar_train) -> Path:
    """ResNet-20, mse, W8A8, onnxruntime plan, 512 calibration images."""
    return _r20_recipe(tmp_path_factory, r20_weights, cifar_train, "w8a8", "onnxruntime", CALIB_R20)


@pytest.fixture(scope="session")
def r20_w4a4(tmp_path_factory, r20_weights, cifar_train) -> Path:
    """ResNet-20, mse, W4A4, onnxruntime plan, 128 calibration images."""
    return _r20_recipe(tmp_path_factory, r20_weights, cifar_train, "w4a4", "onnxruntime", CALIB_SMALL)


@pytest.fixture(scope="session")
def r20_trt(tmp_path_factory, r20_weights, cifar_train) -> Path:
    """ResNet-20, mse, W8A8, tensorrt plan (symmetric: every activation signed), 128 calibration images."""
    return _r20_recipe(tmp_path_factory, r20_weights, cifar_train, "w8a8", "tensorrt", CALIB_SMALL)


@pytest.fixture(scope="session")
def r20_w8a8_onnx(tmp_path_factory, r20_w8a8) -> Path:
    """The W8A8 recipe exported for onnxruntime (model.onnx + model.fp32.onnx)."""
    from qexport.export.qdq import export_recipe

    qdq, _, _ = export_recipe(r20_w8a8, "onnxruntime", tmp_path_factory.mktemp("r20_onnx") / "model.onnx")
    return qdq


@pytest.fixture(scope="session")
def r20_engine(tmp_path_factory, r20_w8a8_onnx) -> Path:
    """ONNX Runtime engine folder of the W8A8 ResNet-20 export."""
    from qexport.build_engine import build_engine_folder

    return build_engine_folder(r20_w8a8_onnx, tmp_path_factory.mktemp("r20_engine") / "engine", "onnxruntime",
                               threads=2)


@pytest.fixture(scope="session")
def cifar_eval(cifar_test):
    """(x, y) of a seeded subset of test-dev with the CIFAR preprocessing, as tensors."""
    from qexport.data import load_tensor
    from qexport.models import load_model

    pre = load_model("cifar:resnet20").preprocess
    return load_tensor(cifar_test, pre, num_samples=EVAL_N, seed=0)
