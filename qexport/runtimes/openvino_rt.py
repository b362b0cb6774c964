"""OpenVINO (CPU plugin), optional: ``pip install 'qexport[openvino]'``.

Building converts the QDQ ONNX file to OpenVINO IR (``int8.xml``/``.bin``, weights kept in full precision:
``compress_to_fp16=False``), gives it a dynamic batch dim when it can, and compiles it once for the CPU with
explicit properties and ``CACHE_DIR`` inside the engine folder, so a later load reads the compiled blob instead
of compiling again. The model is compiled from the in-memory model, whose cache key depends on the model
content and properties, not on the file path: the cache stays valid after the temporary build folder is renamed
(a compile from the file path would key on the path and miss).

Precision (the parity fix of the ``openvino`` target, docs/openvino.md): left to itself, OpenVINO runs every
part of a model that is not quantized in its CPU's preferred float type, bf16 on CPUs with AVX512-BF16/AMX. In
a QDQ model those parts are the residual Add, the pooling, the bias/ReLU before a requantization: computed in
bf16 (8 significant bits) they move values by up to half an 8-bit step before they are quantized again, so the
engine stops computing what the file (and QuantSim) says. The INT8 model is therefore compiled with
``INFERENCE_PRECISION_HINT=f32`` by default: the integer convolutions stay u8 x i8 (same speed), only the float
glue runs in f32. The FP baseline model keeps OpenVINO's own default (``fp32_precision=None``), the FP engine a
user would otherwise deploy. ``engine.json`` records, per model, the properties, the precision the compiled
model reports and a count of the runtime precision of every executed node (``runtime_precisions``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from qexport.errors import MissingDependencyError, QexportError
from qexport.fileio import atomic_dir, check_output_free
from qexport.runtimes import register_runtime
from qexport.runtimes.base import Runner, Runtime
from qexport.runtimes.engine_folder import (
    engine_meta,
    io_names,
    read_engine_meta,
    resolve_threads,
    source_specs,
    write_engine_json,
)

CACHE_DIR = "cache"
DEVICE = "CPU"
_PRECISIONS = ("f32", "bf16", "f16")
_RECORDED = ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT", "NUM_STREAMS",
             "EXECUTION_MODE_HINT")


def _ov():
    try:
        import openvino
    except ImportError as e:
        raise MissingDependencyError("OpenVINO is not installed: pip install 'qexport[openvino]'") from e
    return openvino


def _properties(threads: int, precision: str | None, cache_dir: Path) -> dict:
    props = {"INFERENCE_NUM_THREADS": int(threads), "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": str(cache_dir)}
    if precision is not None:
        props["INFERENCE_PRECISION_HINT"] = precision
    return props


def model_properties(meta: dict, which: str) -> dict:
    """The compile properties recorded in ``engine.json`` for one model (``int8`` or ``fp32``)."""
    per_model = meta.get("model_properties") or {}
    return dict(per_model.get(which) or meta.get("properties") or {})


def runtime_precisions(compiled) -> dict:
    """``{layer type: {runtime precision: count}}`` of the executed graph of a compiled model."""
    out: dict = {}
    try:
        ops = compiled.get_runtime_model().get_ordered_ops()
    except Exception:  # noqa: BLE001
        return out
    for op in ops:
        info = op.get_rt_info()
        try:
            kind, prec = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        except Exception:  # noqa: BLE001
            continue
        if kind in ("Const", "Input", "Output"):
            continue
        out.setdefault(kind, {})
        out[kind][prec] = out[kind].get(prec, 0) + 1
    return out


def _compile(xml: Path, props: dict):
    ov = _ov()
    core = ov.Core()
    try:
        return core.compile_model(core.read_model(str(xml)), DEVICE, props)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QexportError(f"OpenVINO cannot compile {xml}: {msg}") from e


def _compiled_properties(compiled) -> dict:
    out = {}
    for key in _RECORDED:
        try:
            out[key] = str(compiled.get_property(key))
        except Exception:  # noqa: BLE001 - a property this OpenVINO version does not report
            pass
    return out


def _shape(partial, onnx_shape: list) -> list:
    """Shape list of an OpenVINO PartialShape: static dims as ints, a dynamic batch keeps its ONNX symbol."""
    dims = []
    for i, d in enumerate(partial):
        if d.is_static:
            dims.append(d.get_length())
        else:
            sym = onnx_shape[i] if i < len(onnx_shape) else -1
            dims.append(sym if isinstance(sym, str) else -1)
    return dims


class OpenVinoRunner(Runner):
    """Runs one model of an openvino engine folder through one infer request.

    Args:
        compiled: the ``openvino.CompiledModel``.
        meta: the engine's ``engine.json``.
        which: ``"int8"`` or ``"fp32"``.
        threads: inference threads.
    """

    def __init__(self, compiled, meta: dict, which: str, threads: int):
        super().__init__(meta, which, threads)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        try:
            self.loaded_from_cache = bool(compiled.get_property("LOADED_FROM_CACHE"))
        except Exception:  # noqa: BLE001
            self.loaded_from_cache = False

    def _infer(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: x})
        return np.array(self.request.get_output_tensor(0).data, copy=True)

    @classmethod
    def expose_tensors(cls, engine_dir: Path, names: Sequence[str],
                       threads: int | None = None) -> tuple[Callable[[np.ndarray], dict], set[str]]:
        """The engine's INT8 IR with the named tensors it still holds added as outputs, compiled without cache.

        Args:
            engine_dir: an openvino engine folder.
            names: tensor names.
            threads: inference threads (None: the engine's).

        Returns:
            (call: batch -> ``{name: array, "__output__": logits}``, the names exposed).
        """
        ov = _ov()
        meta = read_engine_meta(engine_dir, target="openvino", which="int8")
        core = ov.Core()
        model = core.read_model(str(Path(engine_dir) / meta["models"]["int8"]))
        tensors = {}
        for op in model.get_ordered_ops():
            for out in op.outputs():
                for n in out.get_names():
                    tensors.setdefault(n, out)
        have = [n for n in names if n in tensors]
        if have:
            model.add_outputs([tensors[n] for n in have])
        props = model_properties(meta, "int8")
        props.pop("CACHE_DIR", None)  # a throw-away model: keep the engine's cache clean
        props["INFERENCE_NUM_THREADS"] = resolve_threads(threads if threads is not None else meta.get("threads"))
        compiled = core.compile_model(model, DEVICE, props)
        request = compiled.create_infer_request()
        outs = list(compiled.outputs)

        def run(x: np.ndarray) -> dict:
            request.infer({0: x})
            res = {}
            for i, o in enumerate(outs):
                arr = np.array(request.get_output_tensor(i).data, copy=True)
                if i == 0:
                    res["__output__"] = arr
                for n in o.get_names():
                    res[n] = arr
            return res

        return run, set(have)


@register_runtime("openvino")
class OpenVino(Runtime):
    """OpenVINO on the CPU plugin."""

    runner = OpenVinoRunner


    def build_engine(self, onnx_path: Path, out_dir: Path, *, fp32_onnx: Path | None = None,
                     threads: int | None = None, force: bool = False, precision: str | None = "f32",
                     fp32_precision: str | None = None, dynamic_batch: bool = True, **opts) -> Path:
        """Convert to IR, compile once for the CPU and keep IR, compiled-model cache and ``engine.json``.

        Args:
            onnx_path: the INT8 QDQ ONNX model.
            out_dir: the engine folder (written atomically; ``int8.xml/.bin``, ``fp32.xml/.bin``, ``cache/``).
            fp32_onnx: the FP32 baseline ONNX, converted alongside when given.
            threads: ``INFERENCE_NUM_THREADS`` (None: all cores this process may use).
            force: replace an existing folder.
            precision: ``INFERENCE_PRECISION_HINT`` of the INT8 model (``"f32"``, default: the parity setting,
                see the module docstring; ``"bf16"``, ``"f16"``; None leaves OpenVINO's default).
            fp32_precision: the same for the FP baseline model (None, default: OpenVINO's default).
            dynamic_batch: make a static batch dim dynamic (kept static if the model cannot be reshaped).
            **opts: no other options are accepted.

        Returns:
            The engine folder.
        """
        ov = _ov()
        if opts:
            raise QexportError(f"unknown openvino option(s): {', '.join(sorted(opts))}")
        for p in (precision, fp32_precision):
            if p is not None and p not in _PRECISIONS:
                raise QexportError(f"unknown OpenVINO precision {p!r}; choose one of {', '.join(_PRECISIONS)}")
        hints = {"int8": precision, "fp32": fp32_precision}
        out_dir = check_output_free(out_dir, force)
        threads = resolve_threads(threads)
        ins, outs, sources = source_specs(onnx_path, fp32_onnx)
        models: dict = {"int8": None, "fp32": None}
        compiled_props: dict = {}
        run_precisions: dict = {}
        with atomic_dir(out_dir, force=force) as tmp:
            for which, spec in sources.items():
                src = spec["path"]
                model = self._read(ov, src, dynamic_batch)
                if which == "int8":
                    ins = {**ins, "shape": _shape(model.inputs[0].get_partial_shape(), ins["shape"])}
                    outs = {**outs, "shape": _shape(model.outputs[0].get_partial_shape(), outs["shape"])}
                models[which] = f"{which}.xml"
                ov.save_model(model, str(tmp / models[which]), compress_to_fp16=False)
                compiled = _compile(tmp / models[which], _properties(threads, hints[which], tmp / CACHE_DIR))
                compiled_props[which] = _compiled_properties(compiled)
                run_precisions[which] = runtime_precisions(compiled)
                OpenVinoRunner(compiled, {"input": ins, "output": outs, "target": "openvino"}, which,
                               threads).infer(np.zeros([d if isinstance(d, int) and d > 0 else 1
                                                        for d in ins["shape"]], np.float32))
            props = {w: _properties(threads, hints[w], Path(CACHE_DIR)) for w in sources}
            meta = engine_meta("openvino", models, ins, outs, threads, {"openvino": ov.__version__},
                               Path(onnx_path), fp32_onnx and Path(fp32_onnx), io=io_names(sources), device=DEVICE,
                               properties=props["int8"], model_properties=props,
                               compiled_properties=compiled_props, runtime_precisions=run_precisions,
                               weights="IR saved with compress_to_fp16=False")
            write_engine_json(tmp, meta)
        return out_dir

    @staticmethod
    def _read(ov, src: Path, dynamic_batch: bool):
        """Read an ONNX file into an OpenVINO model; give it a dynamic batch dim when asked and possible."""
        try:
            model = ov.Core().read_model(str(src))
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QexportError(f"OpenVINO cannot read {src}: {msg}") from e
        if len(model.inputs) != 1:
            raise QexportError(f"{src} has {len(model.inputs)} inputs; qexport engines take one")
        shape = model.inputs[0].get_partial_shape()
        if dynamic_batch and shape.rank.is_static and shape[0].is_static:
            dyn = ov.PartialShape([ov.Dimension()] + [shape[i] for i in range(1, shape.rank.get_length())])
            try:
                model.reshape({model.inputs[0]: dyn})
            except Exception:  # noqa: BLE001 - e.g. a Reshape with a hard-coded batch: keep the static shape
                model = ov.Core().read_model(str(src))
        return model

    def load_engine(self, engine_dir: Path, which: str = "int8", threads: int | None = None) -> OpenVinoRunner:
        """Compile (or read from the engine's cache) one model of an openvino engine folder.

        Args:
            engine_dir: folder written by :meth:`build_engine`.
            which: ``"int8"`` or ``"fp32"``.
            threads: override ``INFERENCE_NUM_THREADS`` (not part of OpenVINO's cache key: still a cache hit).

        Returns:
            An OpenVinoRunner; its ``loaded_from_cache`` says whether compilation was skipped.
        """
        _ov()
        meta = read_engine_meta(engine_dir, target="openvino", which=which)
        threads = resolve_threads(threads if threads is not None else meta.get("threads"))
        props = model_properties(meta, which)
        props["INFERENCE_NUM_THREADS"] = threads
        props["CACHE_DIR"] = str(Path(engine_dir).resolve() / props.get("CACHE_DIR", CACHE_DIR))
        compiled = _compile(Path(engine_dir) / meta["models"][which], props)
        return OpenVinoRunner(compiled, meta, which, threads)
