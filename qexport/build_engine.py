"""``qexport build-engine``: check that the ONNX file suits the runtime, then let the runtime build."""

from __future__ import annotations

from pathlib import Path

from qexport.errors import QexportError


def read_qexport_metadata(onnx_path: Path) -> dict[str, str]:
    """The ``qexport.*`` metadata of an ONNX file (without loading its weights).

    Args:
        onnx_path: the file.

    Returns:
        key -> value (empty for files not written by qexport).
    """
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf raises various types on garbage
        raise QexportError(f"{onnx_path} is not a readable ONNX file ({type(e).__name__}); export it again") from None
    return {p.key: p.value for p in model.metadata_props if p.key.startswith("qexport.")}


def build_engine_folder(onnx_path: Path, output: Path, target: str, *, fp32: Path | None = None,
                        threads: int | None = None, force: bool = False) -> Path:
    """Build an engine folder for ``target`` from a QDQ ONNX file (and its FP32 baseline).

    Args:
        onnx_path: the QDQ ONNX file.
        output: the engine folder.
        target: runtime name.
        fp32: FP32 baseline ONNX; default ``<name>.fp32.onnx`` beside the QDQ file when it exists.
        threads: CPU threads.
        force: overwrite an existing folder.

    Returns:
        The engine folder.
    """
    from qexport.export.qdq import fp32_path_for
    from qexport.fileio import check_output_free
    from qexport.quant.targets import get_target
    from qexport.runtimes import get_runtime

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise QexportError(f"ONNX file {onnx_path} not found; create it with `qexport export`")
    check_output_free(output, force)
    runtime = get_runtime(target)
    meta = read_qexport_metadata(onnx_path)
    made_for = meta.get("qexport.target")
    if meta.get("qexport.kind") == "fp32":
        raise QexportError(f"{onnx_path} is the FP32 baseline; pass the QDQ file that `qexport export` wrote")
    if made_for and target not in get_target(made_for).runtimes:
        raise QexportError(f"{onnx_path} was exported for {made_for}, not {target}; "
                           f"run `qexport export RECIPE --target {target}` first")
    if fp32 is None:
        cand = fp32_path_for(onnx_path)
        fp32 = cand if cand.is_file() else None
    elif not Path(fp32).is_file():
        raise QexportError(f"FP32 baseline {fp32} not found")
    return runtime.build_engine(onnx_path, Path(output), fp32_onnx=fp32, threads=threads, force=force)
