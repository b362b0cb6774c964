"""Base classes: a :class:`Runtime` builds and loads engine folders; a :class:`Runner` runs one loaded model.

As in Polygraphy, the public :meth:`Runner.infer` checks its input and calls the backend's ``_infer``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

import numpy as np

from qexport.errors import QexportError
from qexport.latency import LatencyStats, measure


class Runner(abc.ABC):
    """One loaded engine model (``int8`` or ``fp32``) that maps an image batch to outputs.

    Args:
        meta: the engine's ``engine.json`` content.
        which: ``"int8"`` or ``"fp32"``.
        threads: CPU threads the runner uses.
        max_batch: largest batch the engine accepts (None: no limit).
    """

    def __init__(self, meta: dict, which: str, threads: int, max_batch: int | None = None):
        self.meta = meta
        self.which = which
        self.threads = int(threads)
        self.max_batch = max_batch
        names = (meta.get("io") or {}).get(which) or {}
        self.input_name: str = names.get("input", meta["input"]["name"])
        self.output_name: str = names.get("output", meta["output"]["name"])

    @property
    def target(self) -> str:
        """The runtime name, e.g. ``onnxruntime``."""
        return self.meta["target"]

    @property
    def input_shape(self) -> tuple:
        """Engine input shape; the batch dim is a symbol or -1 when dynamic."""
        return tuple(self.meta["input"]["shape"])

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Validate a batch against the engine input (dtype float32, rank, every fixed dim).

        Args:
            x: the batch.

        Returns:
            ``x`` as a C-contiguous array.
        """
        if not isinstance(x, np.ndarray):
            raise QexportError(f"engine input must be a numpy array, got {type(x).__name__}")
        if x.dtype != np.float32:
            raise QexportError(f"engine input must be float32, got {x.dtype}; convert with x.astype(np.float32)")
        shape = self.input_shape
        if x.ndim != len(shape):
            raise QexportError(f"engine input must have rank {len(shape)} (shape {list(shape)}), got shape "
                               f"{list(x.shape)}")
        if x.shape[0] < 1:
            raise QexportError("engine input is an empty batch")
        for i, (got, want) in enumerate(zip(x.shape, shape, strict=True)):
            if isinstance(want, int) and want > 0 and got != want:
                what = "batch size" if i == 0 else f"dim {i}"
                hint = "; export the model with a dynamic batch dim for other sizes" if i == 0 else ""
                raise QexportError(f"engine input {what} is {got}, the engine takes {want} "
                                   f"(shape {list(shape)}, got {list(x.shape)}){hint}")
        if self.max_batch is not None and x.shape[0] > self.max_batch:
            raise QexportError(f"batch {x.shape[0]} exceeds the engine's maximum {self.max_batch}; "
                               "rebuild it with a larger maximum batch")
        return np.ascontiguousarray(x)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run one batch.

        Args:
            x: float32 batch matching :attr:`input_shape` (any batch size the engine allows).

        Returns:
            The first output, as a numpy array owned by the caller.
        """
        return self._infer(self.check_input(x))

    @abc.abstractmethod
    def _infer(self, x: np.ndarray) -> np.ndarray:
        """Run a checked batch; return the first output."""

    def example_input(self, batch_size: int, seed: int = 0) -> np.ndarray:
        """A deterministic random batch of the engine's input shape.

        Args:
            batch_size: images in the batch.
            seed: random seed.

        Returns:
            A float32 array of shape ``(batch_size, *input_shape[1:])``.
        """
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in self.input_shape[1:]]
        return np.random.default_rng(seed).standard_normal((batch_size, *dims), dtype=np.float32)

    def timed_call(self, batch_size: int) -> Callable[[], object]:
        """A zero-argument call that runs one batch and blocks until it is done (for timing).

        Args:
            batch_size: images per call.

        Returns:
            The call (inputs prepared once, outside the timed part).
        """
        x = self.check_input(self.example_input(batch_size))
        return lambda: self._infer(x)

    def benchmark(self, batch_size: int, warmup: int = 10, iters: int = 100, min_time_s: float = 0) -> LatencyStats:
        """Latency of this engine on random inputs of a batch size.

        Args:
            batch_size: images per call.
            warmup: untimed calls first.
            iters: minimum number of timed calls.
            min_time_s: minimum total timed duration.

        Returns:
            LatencyStats (p50/p90/p99/mean in ms per call, throughput in images/s).
        """
        return measure(self.timed_call(batch_size), warmup, iters, min_time_s, batch_size=batch_size)

    @classmethod
    def expose_tensors(cls, engine_dir: Path, names: Sequence[str],
                       threads: int | None = None) -> tuple[Callable[[np.ndarray], dict], set[str]] | None:
        """Load the engine's INT8 model with some intermediate tensors as extra outputs (per-layer divergence).

        Backends that can add outputs override this; the default says they cannot.

        Args:
            engine_dir: an engine folder of this runtime.
            names: tensor names of the exported ONNX file (e.g. ``<point>.q``, the codes of an activation point).
            threads: CPU threads (None: the engine's).

        Returns:
            None when this runtime cannot expose tensors; else (a call mapping an input batch to
            ``{name: array}`` for every exposed tensor plus ``"__output__"`` for the model output, the set of
            names it exposes: those the engine still computes after its optimizations).
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r}, which={self.which!r}, threads={self.threads})"


class Runtime(abc.ABC):
    """A registered runtime backend: builds engine folders and loads runners from them."""

    name: str = ""
    runner: type[Runner] = Runner  # the Runner class its engines load into

    @abc.abstractmethod
    def build_engine(self, onnx_path: Path, out_dir: Path, *, fp32_onnx: Path | None = None,
                     threads: int | None = None, force: bool = False, **opts) -> Path:
        """Build an engine folder from a QDQ ONNX file (and optionally its FP32 baseline).

        Args:
            onnx_path: the INT8 QDQ ONNX model.
            out_dir: the engine folder to write (atomically).
            fp32_onnx: the FP32 baseline ONNX, built alongside when given.
            threads: CPU threads (None: all cores this process may use).
            force: replace an existing folder.
            **opts: backend options.

        Returns:
            The engine folder.
        """

    @abc.abstractmethod
    def load_engine(self, engine_dir: Path, which: str = "int8", threads: int | None = None) -> Runner:
        """Load one model of an engine folder.

        Args:
            engine_dir: folder written by :meth:`build_engine`.
            which: ``"int8"`` or ``"fp32"``.
            threads: override the thread count recorded at build time.

        Returns:
            A Runner.
        """
