"""Runtime backends: build an engine folder from a QDQ ONNX file, load it, run and time batches.

Backends register by name (``onnxruntime``, ``openvino``, ``tensorrt``); built-in ones are imported on first
use, and each imports its runtime lazily, so ``import qexport.runtimes`` needs neither OpenVINO nor TensorRT.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, TypeVar

from qexport.errors import QexportError
from qexport.runtimes.base import Runner, Runtime
from qexport.runtimes.engine_folder import ENGINE_FORMAT, ENGINE_VERSION, read_engine_meta

__all__ = ["ENGINE_FORMAT", "ENGINE_VERSION", "Runner", "Runtime", "get_runtime", "list_runtimes",
           "load_engine", "read_engine_meta", "register_runtime"]

_BUILTIN = {
    "onnxruntime": "qexport.runtimes.onnxrt",
    "openvino": "qexport.runtimes.openvino_rt",
    "tensorrt": "qexport.runtimes.trt",
}
_REGISTRY: dict[str, type[Runtime]] = {}

T = TypeVar("T", bound=type)


def register_runtime(name: str) -> Callable[[T], T]:
    """Class decorator that registers a :class:`Runtime` subclass under ``name``.

    Args:
        name: the target name users pass (``--target``).

    Returns:
        The decorator (it returns the class unchanged, with ``name`` set).
    """

    def deco(cls: T) -> T:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"runtime {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_runtimes() -> list[str]:
    """Names of all known runtimes (built-in and registered), whether or not their package is installed.

    Returns:
        Sorted names.
    """
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def get_runtime(name: str) -> Runtime:
    """The backend for a runtime name.

    Args:
        name: e.g. ``onnxruntime``.

    Returns:
        A Runtime instance (its runtime package is imported only when it builds or loads).
    """
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise QexportError(f"unknown runtime {name!r}; known runtimes: {', '.join(list_runtimes())}")
    return _REGISTRY[name]()


def load_engine(engine_dir: str | Path, which: str = "int8", threads: int | None = None) -> Runner:
    """Load one model of an engine folder, whatever its runtime (read from ``engine.json``).

    Args:
        engine_dir: folder written by ``qexport build-engine``.
        which: ``"int8"`` or ``"fp32"`` (the FP32 baseline, when it was built).
        threads: override the CPU thread count recorded at build time.

    Returns:
        A Runner for that model.
    """
    meta = read_engine_meta(engine_dir, which=which)
    target = meta["target"]
    if target not in list_runtimes():
        raise QexportError(f"{engine_dir} is an engine for runtime {target!r}, which this qexport does not know "
                           f"(known: {', '.join(list_runtimes())}); rebuild it with `qexport build-engine`")
    return get_runtime(target).load_engine(Path(engine_dir), which=which, threads=threads)
