"""ONNX Runtime (CPU execution provider): the embedded default runtime.

Building runs ORT's graph optimizer once and keeps the optimized model in the engine folder
(``SessionOptions.optimized_model_filepath``); loading skips what was already done.

Which optimization level is saved (``opt_level``):

- ``"extended"`` (default): the saved file holds ORT's QDQ fusions (QLinearConv, QGemm, QLinearAdd, FusedConv;
  ``com.microsoft`` contrib ops of the CPU provider) but no hardware-specific layout. It is loaded with
  ``ORT_ENABLE_ALL``, which adds only the layout transforms (NCHWc) for the CPU it runs on: portable across
  x86 CPUs, same speed as ``"all"``.
- ``"all"``: the saved file also holds ORT's NCHWc layout ops (``com.microsoft.nchwc``), chosen for this CPU's
  vector width; ORT warns that such a file should only run where it was optimized. Loaded with
  ``ORT_DISABLE_ALL``. Use it only when the engine runs on the build machine.
- ``"basic"``: constant folding and redundant-node removal only (Q/DQ kept); loaded with ``ORT_ENABLE_ALL``.

Either way the build reloads the saved file exactly as :meth:`OnnxRuntime.load_engine` will and checks that it
gives the same outputs as the in-memory session it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from qexport.errors import QexportError
from qexport.fileio import atomic_dir, check_output_free
from qexport.runtimes import register_runtime
from qexport.runtimes.base import Runner, Runtime
from qexport.runtimes.engine_folder import (engine_meta, io_names, read_engine_meta, resolve_threads, source_specs,
                                     write_engine_json)

_SAVE_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
_LOAD_LEVELS = {"basic": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_ALL", "all": "ORT_DISABLE_ALL"}
_PROVIDERS = ["CPUExecutionProvider"]


def _session_options(threads: int, level: str, save_to: Path | None = None, spin: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only: the "hardware specific" warning of opt_level="all" is documented
    if save_to is not None:
        so.optimized_model_filepath = str(save_to)
    return so


def _session(onnx_path: Path, threads: int, level: str, save_to: Path | None = None, spin: bool = True):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(onnx_path), _session_options(threads, level, save_to, spin),
                                    providers=_PROVIDERS)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QexportError(f"ONNX Runtime cannot load {onnx_path}: {msg}") from e


def session_for(onnx_path: str | Path, threads: int | None = None, optimize: bool = True):
    """An ONNX Runtime CPU session for an ONNX file.

    With ``optimize=False`` (``ORT_DISABLE_ALL``) every node runs as written, one op after another: Q/DQ pairs
    are computed in float, so the session is the float reference of what a QDQ file means.

    Args:
        onnx_path: the ONNX model.
        threads: intra-op threads (None: all cores this process may use); inter-op is 1, execution sequential.
        optimize: ``True`` for ``ORT_ENABLE_ALL`` (fused integer kernels), ``False`` for op by op.

    Returns:
        An ``onnxruntime.InferenceSession``.
    """
    level = "ORT_ENABLE_ALL" if optimize else "ORT_DISABLE_ALL"
    return _session(Path(onnx_path), resolve_threads(threads), level)


class OrtRunner(Runner):
    """Runs one model of an onnxruntime engine folder.

    Args:
        session: the ``onnxruntime.InferenceSession``.
        meta: the engine's ``engine.json``.
        which: ``"int8"`` or ``"fp32"``.
        threads: intra-op threads of the session.
    """

    def __init__(self, session, meta: dict, which: str, threads: int):
        super().__init__(meta, which, threads)
        self.session = session
        ins, outs = {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}
        if self.input_name not in ins or self.output_name not in outs:
            raise QexportError(f"engine.json names input {self.input_name!r} / output {self.output_name!r} for the "
                               f"{which} model, which has inputs {sorted(ins)} and outputs {sorted(outs)}; "
                               "rebuild it with `qexport build-engine`")

    def _infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    @classmethod
    def expose_tensors(cls, engine_dir: Path, names: Sequence[str],
                       threads: int | None = None) -> tuple[Callable[[np.ndarray], dict], set[str]]:
        """The engine's optimized INT8 model with the named tensors it still computes added as graph outputs.

        Args:
            engine_dir: an onnxruntime engine folder.
            names: tensor names.
            threads: intra-op threads (None: the engine's).

        Returns:
            (call: batch -> ``{name: array, "__output__": logits}``, the names exposed).
        """
        import onnx

        meta = read_engine_meta(engine_dir, target="onnxruntime", which="int8")
        model = onnx.load(str(Path(engine_dir) / meta["models"]["int8"]))
        produced = {o for n in model.graph.node for o in n.output}
        have = [n for n in names if n in produced]
        existing = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in have if n not in existing)
        level = (meta.get("optimization") or {}).get("load", "ORT_ENABLE_ALL")
        with tempfile.TemporaryDirectory(prefix="qexport-expose-") as tmp:
            path = Path(tmp) / "exposed.onnx"
            onnx.save(model, str(path))
            session = _session(path, resolve_threads(threads if threads is not None else meta.get("threads")), level)
        in_name = session.get_inputs()[0].name
        out_names = [o.name for o in session.get_outputs()]

        def run(x: np.ndarray) -> dict:
            res = session.run(None, {in_name: x})
            return {**dict(zip(out_names, res)), "__output__": res[0]}

        return run, set(have)


def _example_batch(shape: list, seed: int = 0) -> np.ndarray:
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 2
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in shape[1:]]
    return np.random.default_rng(seed).standard_normal((batch, *dims), dtype=np.float32)


@dataclass(frozen=True)
class OrtBuildOptions:
    """Build options of the onnxruntime target (``qexport build-engine --target onnxruntime --help``)."""

    opt_level: str = field(default="extended", metadata={
        "help": "graph optimization level saved in the engine: 'extended' (portable, the default), 'all' (adds "
                "layout changes tuned to this CPU: the engine is then for this machine only) or 'basic'"})

    def __post_init__(self) -> None:
        if self.opt_level not in _SAVE_LEVELS:
            raise QexportError(f"unknown onnxruntime opt_level {self.opt_level!r}; choose one of "
                               f"{', '.join(_SAVE_LEVELS)}")


@register_runtime("onnxruntime")
class OnnxRuntime(Runtime):
    """ONNX Runtime on the CPU execution provider."""

    options = OrtBuildOptions
    runner = OrtRunner

    def build_engine(self, onnx_path: Path, out_dir: Path, *, fp32_onnx: Path | None = None,
                     threads: int | None = None, force: bool = False, opt_level: str = OrtBuildOptions.opt_level,
                     **opts) -> Path:
        """Optimize the QDQ model (and the FP32 baseline) with ONNX Runtime and keep the results.

        Args:
            onnx_path: the INT8 QDQ ONNX model.
            out_dir: the engine folder (written atomically; ``int8.onnx``, ``fp32.onnx``, ``engine.json``).
            fp32_onnx: the FP32 baseline ONNX, optimized alongside when given.
            threads: intra-op threads (None: all cores this process may use).
            force: replace an existing folder.
            opt_level: ``"extended"`` (default, portable), ``"all"`` (this CPU only) or ``"basic"``; see the
                module docstring.
            **opts: no other options are accepted.

        Returns:
            The engine folder.
        """
        import onnxruntime as ort

        if opts:
            raise QexportError(f"unknown onnxruntime option(s): {', '.join(sorted(opts))}")
        OrtBuildOptions(opt_level)  # validates
        out_dir = check_output_free(out_dir, force)
        threads = resolve_threads(threads)
        ins, outs, sources = source_specs(onnx_path, fp32_onnx)
        models: dict = {"int8": None, "fp32": None}
        with atomic_dir(out_dir, force=force) as tmp:
            for which, spec in sources.items():
                src = spec["path"]
                models[which] = f"{which}.onnx"
                self._optimize(src, tmp / models[which], threads, opt_level, spec["input"])
            meta = engine_meta("onnxruntime", models, ins, outs, threads, {"onnxruntime": ort.__version__},
                               Path(onnx_path), fp32_onnx and Path(fp32_onnx), io=io_names(sources),
                               providers=_PROVIDERS,
                               optimization={"saved": _SAVE_LEVELS[opt_level], "load": _LOAD_LEVELS[opt_level],
                                             "opt_level": opt_level, "portable": opt_level != "all"},
                               session={"intra_op_num_threads": threads, "inter_op_num_threads": 1,
                                        "execution_mode": "ORT_SEQUENTIAL"})
            write_engine_json(tmp, meta)
        return out_dir

    @staticmethod
    def _optimize(src: Path, dst: Path, threads: int, opt_level: str, input_name: str) -> None:
        """Save ORT's optimized model of ``src`` to ``dst`` and check that reloading it gives the same outputs."""
        built = _session(src, threads, _SAVE_LEVELS[opt_level], save_to=dst)
        if not dst.is_file():
            raise QexportError(f"ONNX Runtime did not write the optimized model for {src}")
        reloaded = _session(dst, threads, _LOAD_LEVELS[opt_level])
        # Like for like: where loading optimizes further (basic, extended), the source optimized at the load level
        # runs the same kernels; a basic save alone runs unfused float convs, which differ from fused int8 ones by
        # a step here and there (and by far more on CPUs whose int8 kernels saturate int16 pairs).
        load_level = _LOAD_LEVELS[opt_level]
        reference = built if load_level == "ORT_DISABLE_ALL" else _session(src, threads, load_level)
        x = _example_batch(list(built.get_inputs()[0].shape))
        a = reference.run(None, {input_name: x})[0]
        b = reloaded.run(None, {input_name: x})[0]
        tol = 1e-5 * max(1.0, float(np.abs(a).max()))
        if a.shape != b.shape or not np.allclose(a, b, rtol=1e-5, atol=tol):
            raise QexportError(f"the model ONNX Runtime saved for {src} gives different outputs when reloaded "
                               f"(max diff {float(np.abs(a - b).max()) if a.shape == b.shape else 'shape'}); "
                               "build with opt_level='basic'")

    def load_engine(self, engine_dir: Path, which: str = "int8", threads: int | None = None) -> OrtRunner:
        """Open one model of an onnxruntime engine folder.

        The session's worker threads do not spin-wait between calls. verify and the benchmarks time engines
        interleaved in one process, and a spinning pool keeps the cores busy long after its call returned:
        on 2 cores, ResNet-18 W8A8 interleaved with FP32 measured a median of 20 ms spinning vs 7.6 ms not
        (bench/README.md). Alone, spinning is up to 15 % faster on ResNet-20 at batch 1 and equal on ResNet-18.

        Args:
            engine_dir: folder written by :meth:`build_engine`.
            which: ``"int8"`` or ``"fp32"``.
            threads: override the recorded intra-op thread count.

        Returns:
            An OrtRunner.
        """
        meta = read_engine_meta(engine_dir, target="onnxruntime", which=which)
        threads = resolve_threads(threads if threads is not None else meta.get("threads"))
        level = meta.get("optimization", {}).get("load", "ORT_ENABLE_ALL")
        session = _session(Path(engine_dir) / meta["models"][which], threads, level, spin=False)
        return OrtRunner(session, meta, which, threads)

