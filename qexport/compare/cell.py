"""One cell of ``qexport compare``: recipe (shared), export, engine, a verify report per evaluation folder."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from qexport.errors import QexportError


def cell_dir(out: Path, method: str, bits: str, target: str) -> Path:
    """Folder of one cell."""
    return Path(out) / "cells" / f"{method}_{bits}_{target}"


def recipe_dir(out: Path, method: str, bits: str, plan_target: str) -> Path:
    """Folder of the recipe a cell exports (shared by the targets that use the same plan)."""
    return Path(out) / "recipes" / f"{method}_{bits}_{plan_target}"


def ensure_recipe(cfg, out: Path, method: str, bits: str, plan_target: str) -> Path:
    """The cell's recipe: reused when its folder is complete, else calibrated now (written atomically).

    Returns:
        The recipe folder.
    """
    from qexport.calibrators import get_calibrator
    from qexport.calibrate import CalibrateConfig, calibrate, work_dir_for

    folder = recipe_dir(out, method, bits, plan_target)
    if (folder / "recipe.json").is_file():
        return folder
    info = get_calibrator(method)
    resume = work_dir_for(folder).is_dir()  # an interrupted training method continues from its checkpoint
    return calibrate(CalibrateConfig(model=cfg.model, output=folder, method=method, bits=bits, target=plan_target,
                                     weights=cfg.weights, data=cfg.data if info.needs_data else None,
                                     num_samples=cfg.num_samples, seed=cfg.seed, quiet=True, resume=resume,
                                     options=dict(cfg.method_options.get(method, {}))))


def _export(recipe: Path, target: str, folder: Path) -> Path:
    from qexport.export.qdq import export_recipe, fp32_path_for

    onnx_path = folder / "model.onnx"
    if onnx_path.is_file() and fp32_path_for(onnx_path).is_file():
        return onnx_path
    qdq, _, _ = export_recipe(recipe, target, onnx_path, force=True)
    return qdq


def _engine(onnx_path: Path, target: str, folder: Path, threads: int | None) -> Path:
    from qexport.build_engine import build_engine_folder

    engine = folder / "engine"
    if (engine / "engine.json").is_file():
        return engine
    if engine.exists():
        shutil.rmtree(engine)
    return build_engine_folder(onnx_path, engine, target, threads=threads)


def _reports(cfg, recipe: Path, engine: Path, folder: Path, names: list[str], step: Callable) -> list[dict]:
    from qexport.verify.compare import VerifyConfig, load_report, verify

    reports = []
    for i, (path, name) in enumerate(zip(cfg.eval_data, names)):
        rep_dir = folder / f"report_{name}"
        if not (rep_dir / "report.json").is_file():
            step(f"verify on {name}")
            sizes = (1, cfg.throughput_batch) if i == 0 else ()  # latency once, on the first folder
            verify(VerifyConfig(engine=engine, recipe=recipe, data=Path(path), report=rep_dir,
                                num_samples=cfg.eval_samples, seed=cfg.seed, threads=cfg.threads,
                                bench_batch_sizes=sizes, bench_iters=cfg.bench_iters, force=True, quiet=True))
        reports.append(load_report(rep_dir))
    return reports


def model_sizes(recipe) -> tuple[float, float]:
    """(quantized model KB at its true widths, FP32 model KB): integer weights at their widths, every other
    parameter (biases, float layers) at 4 bytes; scales not counted."""
    numel = {n: int(t.numel()) for n, t in recipe.int_weights.items()}
    total = sum(int(v.numel()) for v in recipe.float_state.values() if v.is_floating_point())
    q_bytes = sum(numel[lp.name] * lp.weight.bits for lp in recipe.plan.layers) / 8.0
    return (q_bytes + 4.0 * (total - sum(numel.values()))) / 1024.0, 4.0 * total / 1024.0


def run_cell(cfg, out: Path, method: str, bits: str, target: str, step: Callable[[str], None]) -> dict:
    """Run one cell to its row (raises QexportError or anything else on failure; the grid records it).

    Args:
        cfg: the CompareConfig.
        out: the comparison folder.
        method, bits, target: the cell.
        step: called with the name of each step, for the progress display.

    Returns:
        The row.
    """
    from qexport.compare.grid import _plan_target, eval_names
    from qexport.recipe import QuantRecipe

    started = time.time()
    folder = cell_dir(out, method, bits, target)
    folder.mkdir(parents=True, exist_ok=True)
    step("calibrate")
    recipe_path = ensure_recipe(cfg, out, method, bits, _plan_target(target))
    step("export")
    onnx_path = _export(recipe_path, target, folder)
    step("build engine")
    engine = _engine(onnx_path, target, folder, cfg.threads)
    reports = _reports(cfg, recipe_path, engine, folder, eval_names(cfg.eval_data), step)
    recipe = QuantRecipe.load(recipe_path)
    return row_from(method, bits, target, recipe, reports, eval_names(cfg.eval_data), time.time() - started)


def row_from(method: str, bits: str, target: str, recipe, reports: list[dict], names: list[str],
             seconds: float) -> dict:
    """The compare row of a finished cell."""
    size, fp32_size = model_sizes(recipe)
    row = {"method": method, "bits": bits, "target": target, "status": "ok", "reason": None,
           "eval": {}, "size_kb": round(size, 2), "fp32_size_kb": round(fp32_size, 2),
           "calibration_seconds": recipe.metrics.get("calibration_seconds"), "cell_seconds": round(seconds, 1),
           "quantsim_arithmetic": reports[0].get("quantsim_arithmetic")}
    for name, rep in zip(names, reports):
        a = rep["accuracy"]
        row["eval"][name] = {"top1": a.get("engine_top1"), "fp32_top1": a.get("fp32_top1"),
                             "quantsim_top1": a.get("quantsim_top1"), "drop_points": a.get("top1_drop_points"),
                             "agreement": a["engine_vs_quantsim_agreement"], "images": rep["data"]["count"]}
    for lat in reports[0].get("latency") or []:
        key = "b1" if lat["batch_size"] == 1 else "bt"
        row[f"latency_{key}_ms"] = lat["int8"]["p50_ms"]
        row[f"throughput_{key}_ips"] = lat["int8"]["throughput_ips"]
        if lat.get("fp32"):
            row[f"fp32_latency_{key}_ms"] = lat["fp32"]["p50_ms"]
            row[f"fp32_throughput_{key}_ips"] = lat["fp32"]["throughput_ips"]
            row[f"speedup_{key}"] = lat.get("speedup")
        if key == "bt":
            row["throughput_batch"] = lat["batch_size"]
    return row


def load_row(path: Path) -> dict:
    """A cell.json."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise QexportError(f"{path} is unreadable ({e}); delete its cell folder to recompute it") from None
