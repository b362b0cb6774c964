"""``qexport run``: calibrate, export, build-engine and verify into one run folder."""

from __future__ import annotations

from pathlib import Path

from qexport.fileio import check_output_free


def run_pipeline(*, model: str, output: Path, eval_data: Path, method: str = "mse", bits: str = "w8a8",
                 weights: Path | None = None, data: Path | None = None, num_samples: int = 512,
                 target: str = "onnxruntime", eval_samples: int | None = None, seed: int = 0,
                 force: bool = False, quiet: bool = False, bench_batch_sizes: tuple[int, ...] = (1,),
                 options: dict | None = None):
    """Run the four steps; the run folder holds ``recipe/``, ``model.onnx``, ``model.fp32.onnx``, ``engine/``,
    ``report/``.

    Args:
        model: model spec.
        output: run folder.
        eval_data: labelled images for verify.
        method: calibration method.
        bits: bit widths.
        weights: checkpoint.
        data: calibration images.
        num_samples: calibration images used.
        target: runtime.
        eval_samples: verify subset size (None: all).
        seed: seed.
        force: overwrite an existing run folder's outputs.
        quiet: no progress bars.
        bench_batch_sizes: batch sizes timed by verify.
        options: method options (name -> value), as for ``qexport calibrate``.

    Returns:
        (the verify report, the run folder).
    """
    import shutil

    from qexport.build_engine import build_engine_folder
    from qexport.export.qdq import export_recipe
    from qexport.calibrate import CalibrateConfig, calibrate
    from qexport.verify.compare import VerifyConfig, verify

    from qexport.calibrators import get_calibrator
    from qexport.options import build_config

    build_config(get_calibrator(method).config, dict(options or {}), f"--method {method}")  # bad options: no folder
    out = check_output_free(output, force)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    recipe = calibrate(CalibrateConfig(model=model, output=out / "recipe", method=method, bits=bits,
                                       target=target,
                                       weights=str(weights) if weights else None, data=str(data) if data else None,
                                       num_samples=num_samples, seed=seed, quiet=quiet,
                                       options=dict(options or {})))
    qdq, _, _ = export_recipe(recipe, target, out / "model.onnx")
    engine = build_engine_folder(qdq, out / "engine", target)
    report, folder = verify(VerifyConfig(engine=engine, recipe=recipe, data=eval_data, report=out / "report",
                                         num_samples=eval_samples, seed=seed, quiet=quiet,
                                         bench_batch_sizes=bench_batch_sizes))
    return report, out
