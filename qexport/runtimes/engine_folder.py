"""The engine folder's ``engine.json``: what every backend writes beside its artifacts, and how it is read back.

An engine folder holds one runtime's compiled/optimized artifact for the INT8 (QDQ) model and, optionally, for
the FP32 baseline, plus ``engine.json``::

    {"format": "qexport-engine", "version": 1, "target": "onnxruntime",
     "models": {"int8": "int8.onnx", "fp32": "fp32.onnx" | null},
     "input": {"name": "input", "shape": ["batch", 3, 32, 32], "dtype": "float32"},
     "output": {"name": "logits", "shape": ["batch", 10], "dtype": "float32"},
     "threads": 2, "versions": {"onnxruntime": "1.32.0", "qexport": "0.1.0"},
     "source_onnx_sha256": "...", "source_metadata": {ONNX metadata_props}, "io": {per-model tensor names},
     ...backend specific keys}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qexport.errors import QexportError
from qexport.fileio import sha256_file  # noqa: F401  (re-exported)

ENGINE_FORMAT = "qexport-engine"
ENGINE_VERSION = 1
ENGINE_JSON = "engine.json"
_REBUILD = "rebuild it with `qexport build-engine`"


def default_threads() -> int:
    """Number of CPU cores this process may run on (the default intra-op thread count).

    Returns:
        The core count, at least 1.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """Validate a thread count; None means :func:`default_threads`.

    Args:
        threads: the requested count or None.

    Returns:
        A positive thread count.
    """
    if threads is None:
        return default_threads()
    if int(threads) < 1:
        raise QexportError(f"threads must be >= 1, got {threads}")
    return int(threads)


def _dims(value_info) -> list:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(-1)
    return dims


def onnx_io_spec(onnx_path: str | os.PathLike) -> tuple[dict, dict]:
    """Name, shape and dtype of the single input and the first output of an ONNX file.

    Args:
        onnx_path: the ONNX model (it must exist and have exactly one graph input).

    Returns:
        ``(input_spec, output_spec)``, each ``{"name", "shape", "dtype"}``; unknown dims are their symbol or -1.
    """
    import onnx
    from onnx import helper

    path = Path(onnx_path)
    if not path.is_file():
        raise QexportError(f"ONNX file {path} not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is a user error here
        raise QexportError(f"cannot read ONNX file {path}: {e}") from e
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or not model.graph.output:
        raise QexportError(f"{path} has {len(inputs)} inputs and {len(model.graph.output)} outputs; "
                           "qexport engines take a model with one input (an image batch) and at least one output")

    def spec(vi) -> dict:
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
        return {"name": vi.name, "shape": _dims(vi), "dtype": dtype}

    ins, out = spec(inputs[0]), spec(model.graph.output[0])
    if ins["dtype"] != "float32":
        raise QexportError(f"{path} takes a {ins['dtype']} input; qexport engines take float32 images")
    return ins, out


def onnx_metadata(onnx_path: str | os.PathLike) -> dict:
    """The ``metadata_props`` of an ONNX file (e.g. the recipe fingerprint ``qexport export`` writes).

    Args:
        onnx_path: the ONNX model.

    Returns:
        key -> value.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def check_same_input(int8_spec: dict, fp32_spec: dict, fp32_onnx: Path) -> None:
    """Fail if the FP32 baseline does not take the same input (all but the batch dim) as the INT8 model.

    Args:
        int8_spec: input spec of the INT8 model.
        fp32_spec: input spec of the FP32 model.
        fp32_onnx: the FP32 file, for the message.
    """
    a, b = int8_spec["shape"], fp32_spec["shape"]
    if len(a) != len(b) or any(isinstance(x, int) and isinstance(y, int) and x > 0 and y > 0 and x != y
                               for x, y in zip(a[1:], b[1:], strict=True)):
        raise QexportError(f"FP32 baseline {fp32_onnx} takes input shape {b}, the INT8 model {a}; "
                           "export both from the same model")


def source_specs(onnx_path: str | os.PathLike, fp32_onnx: str | os.PathLike | None) -> tuple[dict, dict, dict]:
    """Read the I/O of the INT8 model and of the optional FP32 baseline, and check they take the same input.

    Args:
        onnx_path: the INT8 QDQ ONNX model.
        fp32_onnx: the FP32 baseline or None.

    Returns:
        ``(input_spec, output_spec, sources)``; ``sources`` maps ``"int8"``/``"fp32"`` to
        ``{"path": Path, "input": name, "output": name}`` (the two models may name their tensors differently).
    """
    ins, outs = onnx_io_spec(onnx_path)
    sources = {"int8": {"path": Path(onnx_path), "input": ins["name"], "output": outs["name"]}}
    if fp32_onnx is not None:
        fins, fouts = onnx_io_spec(fp32_onnx)
        check_same_input(ins, fins, Path(fp32_onnx))
        sources["fp32"] = {"path": Path(fp32_onnx), "input": fins["name"], "output": fouts["name"]}
    return ins, outs, sources


def engine_meta(target: str, models: dict, input_spec: dict, output_spec: dict, threads: int,
                versions: dict, source_onnx: Path, fp32_onnx: Path | None, **extra) -> dict:
    """Assemble the ``engine.json`` content.

    Args:
        target: runtime name.
        models: ``{"int8": filename, "fp32": filename or None}``.
        input_spec: ``{"name", "shape", "dtype"}`` of the engine input.
        output_spec: the same for the output.
        threads: CPU threads the engine runs with.
        versions: runtime name -> version (qexport's is added).
        source_onnx: the INT8 QDQ ONNX file it was built from.
        fp32_onnx: the FP32 baseline ONNX, if any.
        **extra: backend-specific keys.

    Returns:
        The dictionary to write.
    """
    from qexport import __version__

    meta = {"format": ENGINE_FORMAT, "version": ENGINE_VERSION, "target": target, "models": dict(models),
            "input": input_spec, "output": output_spec, "threads": int(threads),
            "versions": {**versions, "qexport": __version__},
            "source_onnx_sha256": sha256_file(source_onnx), "source_metadata": onnx_metadata(source_onnx),
            "fp32_onnx_sha256": sha256_file(fp32_onnx) if fp32_onnx is not None else None}
    meta.update(extra)
    return meta


def io_names(sources: dict) -> dict:
    """``engine.json``'s ``io`` entry: each model's own input and output tensor names.

    Args:
        sources: from :func:`source_specs`.

    Returns:
        ``{"int8": {"input": name, "output": name}, ...}``.
    """
    return {which: {"input": s["input"], "output": s["output"]} for which, s in sources.items()}


def write_engine_json(folder: Path, meta: dict) -> None:
    """Write ``engine.json`` into a (temporary) engine folder.

    Args:
        folder: the folder being built.
        meta: from :func:`engine_meta`.
    """
    (Path(folder) / ENGINE_JSON).write_text(json.dumps(meta, indent=2) + "\n")


def read_engine_meta(engine_dir: str | os.PathLike, target: str | None = None, which: str | None = None) -> dict:
    """Read and validate ``engine.json``; each problem is a one-line QexportError that says to rebuild.

    Args:
        engine_dir: the engine folder.
        target: when given, the runtime the folder must be for.
        which: when given (``"int8"`` or ``"fp32"``), that model's artifact must be listed and present.

    Returns:
        The parsed ``engine.json``.
    """
    d = Path(engine_dir)
    if not d.is_dir():
        raise QexportError(f"engine folder {d} not found; build one with `qexport build-engine`")
    p = d / ENGINE_JSON
    if not p.is_file():
        raise QexportError(f"{d} has no {ENGINE_JSON}, so it is not a qexport engine; {_REBUILD}")
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise QexportError(f"{p} is not valid JSON ({e}); {_REBUILD}") from e
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != ENGINE_FORMAT:
        raise QexportError(f"{p} is not a qexport engine description (format {fmt!r}); {_REBUILD}")
    if meta.get("version") != ENGINE_VERSION:
        raise QexportError(f"{p} has engine format version {meta.get('version')!r}, this qexport reads version "
                           f"{ENGINE_VERSION}; {_REBUILD}")
    for key in ("target", "models", "input", "output"):
        if key not in meta:
            raise QexportError(f"{p} lacks {key!r}; {_REBUILD}")
    if target is not None and meta["target"] != target:
        raise QexportError(f"{d} is an engine for {meta['target']!r}, not {target!r}; "
                           f"load it with its own runtime or {_REBUILD} --target {target}")
    if which is not None:
        if which not in ("int8", "fp32"):
            raise QexportError(f"unknown engine model {which!r}; choose int8 or fp32")
        name = meta["models"].get(which)
        if not name:
            raise QexportError(f"{d} has no {which} model; {_REBUILD}" +
                               (" --fp32-onnx FILE" if which == "fp32" else ""))
        if not (d / name).is_file():
            raise QexportError(f"{d} lacks its {which} artifact {name}; {_REBUILD}")
    return meta
