"""TensorRT 10 (NVIDIA GPUs), optional: ``pip install tensorrt`` per NVIDIA's install guide, plus a GPU and driver.

Written against the documented TensorRT 10 Python API; qexport's test suite cannot run it without TensorRT and a
GPU (tests marked ``tensorrt``). Device buffers are torch CUDA tensors, work is queued on a
``torch.cuda.Stream``, and :meth:`TensorRTRunner.benchmark` times the engine alone with CUDA events.

- INT8: the QDQ file is parsed into a *strongly typed* network (TensorRT 10's explicit quantization: the Q/DQ
  nodes and tensor types decide the precision; no builder precision flags).
- FP32 baseline: a weakly typed network, TF32 allowed (TensorRT's default), or ``fp32_mode="fp32"`` (TF32 off)
  or ``"fp16"`` (FP16 kernels allowed), or ``"strongly_typed"`` (types as in the file; for TensorRT versions that
  deprecate weak typing).
- One optimization profile over the batch dim (``min_batch``/``opt_batch``/``max_batch``); other dims static.
- Timing cache ``timing.cache`` in the folder: seeded from the folder being replaced (``force``) and from
  ``timing_cache=FILE``, shared by the INT8 and FP32 builds, saved for the next build.
- A plan runs only with the TensorRT version and GPU model it was built with: loading checks both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qexport.errors import MissingDependencyError, QexportError
from qexport.fileio import atomic_dir, check_output_free
from qexport.runtimes import register_runtime
from qexport.runtimes.base import Runner, Runtime
from qexport.runtimes.engine_folder import (engine_meta, io_names, read_engine_meta, resolve_threads, source_specs,
                                     write_engine_json)
from qexport.latency import LatencyStats, stats_from_durations

TIMING_CACHE = "timing.cache"
_FP32_MODES = ("tf32", "fp32", "fp16", "strongly_typed")
_INSTALL = ("TensorRT is not installed: pip install tensorrt (see NVIDIA's TensorRT installation guide), "
            "on a machine with an NVIDIA GPU and driver")
_NO_GPU = ("TensorRT needs an NVIDIA GPU, and torch sees none (torch.cuda.is_available() is False): run on a "
           "machine with an NVIDIA GPU and driver, with a CUDA build of torch")
_LOGGER = None


def _require():
    """Import TensorRT and check for a CUDA GPU; each absence is one MissingDependencyError line."""
    global _LOGGER
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingDependencyError(_INSTALL) from e
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError(_NO_GPU)
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return trt


def _parser_error(err) -> str:
    desc = getattr(err, "desc", None)
    return str(desc() if callable(desc) else err)


def _gpu() -> dict:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise QexportError(f"TensorRT engine has an I/O tensor of type {dtype}, which qexport does not handle")
    return table[dtype]


class TensorRTRunner(Runner):
    """Runs one TensorRT plan with torch CUDA tensors as buffers, on its own CUDA stream.

    Args:
        engine: the deserialized ``tensorrt.ICudaEngine``.
        meta: the engine's ``engine.json``.
        which: ``"int8"`` or ``"fp32"``.
    """

    def __init__(self, engine, meta: dict, which: str):
        import torch

        profile = meta["profiles"][which]
        super().__init__(meta, which, meta.get("threads", 1), max_batch=profile["max"][0])
        self.min_batch = profile["min"][0]
        self.trt = _require()
        self.engine = engine
        self.context = engine.create_execution_context()
        self.device = torch.device("cuda", 0)
        self.stream = torch.cuda.Stream(device=self.device)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.OUTPUT]
        if self.inputs != [self.input_name] or self.output_name not in self.outputs:
            raise QexportError(f"TensorRT plan I/O {self.inputs} -> {self.outputs} does not match engine.json; "
                               "rebuild it with `qexport build-engine`")
        self.dtypes = {n: _torch_dtype(self.trt, engine.get_tensor_dtype(n)) for n in names}

    def check_input(self, x: np.ndarray) -> np.ndarray:
        x = super().check_input(x)
        if x.shape[0] < self.min_batch:
            raise QexportError(f"batch {x.shape[0]} is below the engine's minimum {self.min_batch}")
        return x

    def _bind(self, xt):
        """Set the input shape and every I/O address; return the output tensors (allocated on the stream)."""
        import torch

        self.context.set_input_shape(self.input_name, tuple(xt.shape))
        self.context.set_tensor_address(self.input_name, xt.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        return outs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise QexportError("TensorRT execution failed (execute_async_v3 returned False)")

    def _device_input(self, x: np.ndarray):
        import torch

        return torch.from_numpy(x).to(self.device).to(self.dtypes[self.input_name])

    def _infer(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.cuda.stream(self.stream):
            xt = self._device_input(x)
            outs = self._bind(xt)
            self._execute()
            out = outs[self.output_name].float().cpu()  # synchronous copy on self.stream
        return out.numpy()

    def timed_call(self, batch_size: int):
        """A blocking call on device-resident buffers (no host copies), for interleaved comparisons.

        Args:
            batch_size: images per call.

        Returns:
            The call.
        """
        import torch

        x = self.check_input(self.example_input(batch_size))
        with torch.cuda.stream(self.stream):
            xt = self._device_input(x)
            self._outs = self._bind(xt)  # keep the buffers alive
        self._xt = xt

        def call():
            self._execute()
            self.stream.synchronize()

        return call

    def benchmark(self, batch_size: int, warmup: int = 10, iters: int = 100, min_time_s: float = 0) -> LatencyStats:
        """GPU time of one execution (CUDA events around ``execute_async_v3``), inputs already on the device.

        Args:
            batch_size: images per call.
            warmup: untimed executions first.
            iters: minimum number of timed executions.
            min_time_s: minimum total timed duration.

        Returns:
            LatencyStats.
        """
        import torch

        call = self.timed_call(batch_size)
        for _ in range(warmup):
            call()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        durations: list[float] = []
        while len(durations) < iters or sum(durations) < min_time_s:
            start.record(self.stream)
            self._execute()
            end.record(self.stream)
            end.synchronize()
            durations.append(start.elapsed_time(end) / 1e3)
        return stats_from_durations(durations, batch_size)


@register_runtime("tensorrt")
class TensorRT(Runtime):
    """TensorRT 10 on an NVIDIA GPU."""

    runner = TensorRTRunner

    def build_engine(self, onnx_path: Path, out_dir: Path, *, fp32_onnx: Path | None = None,
                     threads: int | None = None, force: bool = False, min_batch: int = 1, opt_batch: int = 1,
                     max_batch: int = 64, workspace_mb: int = 4096, fp32_mode: str = "tf32",
                     timing_cache: Path | None = None, **opts) -> Path:
        """Build serialized TensorRT plans (strongly typed INT8 from the QDQ file; FP32 baseline optionally).

        Args:
            onnx_path: the INT8 QDQ ONNX model (TensorRT form: int8 Q/DQ, zero points 0).
            out_dir: the engine folder (``int8.plan``, ``fp32.plan``, ``timing.cache``, ``engine.json``).
            fp32_onnx: the FP32 baseline ONNX, built alongside when given.
            threads: recorded only (host threads do not matter to TensorRT).
            force: replace an existing folder (its timing cache seeds this build).
            min_batch: smallest batch of the optimization profile.
            opt_batch: batch the kernels are tuned for.
            max_batch: largest batch.
            workspace_mb: builder workspace memory pool limit.
            fp32_mode: baseline precision, ``"tf32"`` (default), ``"fp32"``, ``"fp16"`` or ``"strongly_typed"``.
            timing_cache: an extra timing cache file to start from.
            **opts: no other options are accepted.

        Returns:
            The engine folder.
        """
        if opts:
            raise QexportError(f"unknown tensorrt option(s): {', '.join(sorted(opts))}")
        if fp32_mode not in _FP32_MODES:
            raise QexportError(f"unknown fp32_mode {fp32_mode!r}; choose one of {', '.join(_FP32_MODES)}")
        if not 1 <= min_batch <= opt_batch <= max_batch:
            raise QexportError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, "
                               f"{max_batch}")
        trt = _require()
        out_dir = check_output_free(out_dir, force)
        threads = resolve_threads(threads)
        ins, outs, sources = source_specs(onnx_path, fp32_onnx)
        blobs = [Path(p).read_bytes() for p in (out_dir / TIMING_CACHE, timing_cache) if p and Path(p).is_file()]
        builder = trt.Builder(_LOGGER)
        models: dict = {"int8": None, "fp32": None}
        profiles: dict = {}
        with atomic_dir(out_dir, force=force) as tmp:
            for which, spec in sources.items():
                src = spec["path"]
                strong = which == "int8" or fp32_mode == "strongly_typed"
                plan, profiles[which], cache = self._build(trt, builder, src, strong, fp32_mode,
                                                           (min_batch, opt_batch, max_batch), workspace_mb, blobs)
                blobs = [cache]
                models[which] = f"{which}.plan"
                (tmp / models[which]).write_bytes(plan)
            (tmp / TIMING_CACHE).write_bytes(blobs[0])
            meta = engine_meta("tensorrt", models, ins, outs, threads, {"tensorrt": trt.__version__},
                               Path(onnx_path), fp32_onnx and Path(fp32_onnx), io=io_names(sources),
                               gpu=_gpu(), profiles=profiles,
                               timing_cache=TIMING_CACHE, workspace_mb=workspace_mb,
                               network={"int8": "strongly_typed",
                                        "fp32": None if fp32_onnx is None else fp32_mode if fp32_mode ==
                                        "strongly_typed" else f"weakly_typed/{fp32_mode}"})
            write_engine_json(tmp, meta)
        return out_dir

    @staticmethod
    def _build(trt, builder, src: Path, strongly_typed: bool, fp32_mode: str, batch: tuple, workspace_mb: int,
               blobs: list) -> tuple[bytes, dict, bytes]:
        """Parse one ONNX file and build its plan; return (plan, profile shapes, serialized timing cache)."""
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, _LOGGER)
        if not parser.parse_from_file(str(src)):
            errs = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
            raise QexportError(f"TensorRT cannot parse {src}: {errs or 'unknown parser error'}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
        if not strongly_typed and fp32_mode == "fp32":
            config.clear_flag(trt.BuilderFlag.TF32)
        if not strongly_typed and fp32_mode == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        cache = config.create_timing_cache(b"")
        for blob in blobs:
            cache.combine(config.create_timing_cache(blob), False)
        config.set_timing_cache(cache, False)
        inp = network.get_input(0)
        dims = list(inp.shape)
        if any(d < 0 for d in dims[1:]):
            raise QexportError(f"{src} has dynamic non-batch dims {dims}; export it with fixed C, H, W")
        shapes = {k: [b if dims[0] < 0 else dims[0]] + dims[1:]
                  for k, b in zip(("min", "opt", "max"), batch, strict=True)}
        if dims[0] < 0:
            profile = builder.create_optimization_profile()
            profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])
            config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise QexportError(f"TensorRT failed to build an engine from {src} (see its log above)")
        return bytes(plan), shapes, bytes(config.get_timing_cache().serialize())

    def load_engine(self, engine_dir: Path, which: str = "int8", threads: int | None = None) -> TensorRTRunner:
        """Deserialize one plan of a tensorrt engine folder.

        Args:
            engine_dir: folder written by :meth:`build_engine`.
            which: ``"int8"`` or ``"fp32"``.
            threads: ignored (recorded for symmetry with the CPU runtimes).

        Returns:
            A TensorRTRunner.
        """
        meta = read_engine_meta(engine_dir, target="tensorrt", which=which)
        trt = _require()
        built_with, gpu = meta.get("versions", {}).get("tensorrt"), meta.get("gpu", {}).get("name")
        if built_with != trt.__version__ or gpu != _gpu()["name"]:
            raise QexportError(f"{engine_dir} was built with TensorRT {built_with} on {gpu}; this is TensorRT "
                               f"{trt.__version__} on {_gpu()['name']}: rebuild it here with `qexport build-engine`")
        runtime = trt.Runtime(_LOGGER)
        engine = runtime.deserialize_cuda_engine((Path(engine_dir) / meta["models"][which]).read_bytes())
        if engine is None:
            raise QexportError(f"TensorRT cannot deserialize {engine_dir}/{meta['models'][which]}; "
                               "rebuild it with `qexport build-engine`")
        runner = TensorRTRunner(engine, meta, which)
        runner._runtime = runtime  # the runtime must outlive the engine
        return runner
