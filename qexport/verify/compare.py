"""verify: the same images through the FP32 model, QuantSim and the engine; parity, accuracy and latency."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qexport.errors import QexportError
from qexport.fileio import atomic_dir, check_output_free
from qexport.progress import progress_bar
from qexport.quant.u8s8_saturation import pairs_saturate, saturation_note


@dataclass(frozen=True)
class VerifyConfig:
    """Options of ``qexport verify``.

    Args:
        engine: engine folder.
        recipe: recipe folder the engine was exported from.
        data: image folder (labelled for top-1).
        more_data: further image folders (e.g. corrupted copies from ``qexport corrupt``), each evaluated the
            same way and reported in ``data_sets``, with the mean over them in ``more_data_mean``.
        report: report folder (default ``<engine>.report`` beside the engine).
        num_samples: images used (None: all), a seeded subset.
        seed: subset seed.
        batch_size: inference batch size.
        threads: runtime threads (None: the engine's).
        bench_batch_sizes: batch sizes timed (empty: no latency).
        bench_iters: timed calls per engine and batch size.
        max_drop: fail when engine top-1 is more than this many points below FP32.
        min_agreement: fail when engine vs QuantSim top-1 agreement (percent) is below this.
        force: overwrite an existing report folder.
        quiet: no progress bars.
    """

    engine: Path
    recipe: Path
    data: Path
    report: Path | None = None
    num_samples: int | None = None
    seed: int = 0
    batch_size: int = 64
    threads: int | None = None
    bench_batch_sizes: tuple[int, ...] = (1,)
    bench_iters: int = 50
    max_drop: float | None = None
    min_agreement: float | None = None
    force: bool = False
    quiet: bool = False
    divergence: bool = True
    more_data: tuple[Path, ...] = ()


def report_dir_for(engine: Path) -> Path:
    """Default report folder: ``<engine>.report`` beside the engine folder."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".report")


def _check_engine_matches_recipe(meta: dict, engine_dir: Path, recipe_dir: Path) -> None:
    from qexport.export.qdq import recipe_fingerprint

    want = (meta.get("source_metadata") or {}).get("qexport.recipe_sha256")
    if want and want != recipe_fingerprint(recipe_dir):
        raise QexportError(f"engine {engine_dir} was not built from recipe {recipe_dir} (its ONNX names another "
                           "recipe); verify it against the recipe it was exported from")


def verify(cfg: VerifyConfig) -> tuple[dict, Path]:
    """Run the comparison, time the engines and write the report.

    Args:
        cfg: options.

    Returns:
        (the report dictionary, the report folder). ``report["passed"]`` is False when a threshold failed.
    """
    from qexport.data import ImageFolder, subset_indices
    from qexport.models import Preprocess
    from qexport.quant.layer_bits import layer_widths
    from qexport.recipe import QuantRecipe
    from qexport.runtimes import load_engine, read_engine_meta

    out = Path(cfg.report) if cfg.report else report_dir_for(cfg.engine)
    check_output_free(out, cfg.force)
    meta = read_engine_meta(cfg.engine, which="int8")
    recipe = QuantRecipe.load(cfg.recipe)
    _check_engine_matches_recipe(meta, Path(cfg.engine), Path(cfg.recipe))
    pre = Preprocess.from_dict(recipe.model.preprocess)
    folders = [ImageFolder(d, pre) for d in (cfg.data, *cfg.more_data)]
    for f in folders:
        f.validate()
    ds = folders[0]
    idx = subset_indices(len(ds), cfg.num_samples, cfg.seed)
    engine = load_engine(cfg.engine, "int8", cfg.threads)
    fp32_engine = load_engine(cfg.engine, "fp32", cfg.threads) if meta["models"].get("fp32") else None
    folded = recipe.build_float_model()
    sim, float_sim = _reference_sims(recipe, folded, meta)
    models = {"fp32": folded, "quantsim": sim, "quantsim_float": float_sim, "engine": engine.infer,
              "fp32_engine": fp32_engine.infer if fp32_engine is not None else None}
    accuracy = _evaluate(ds, idx, models, cfg)
    data_sets = []
    for f in folders[1:]:
        f_idx = subset_indices(len(f), cfg.num_samples, cfg.seed)
        data_sets.append({"path": str(f.root), "count": len(f_idx), "labelled": f.labelled,
                          "accuracy": _evaluate(f, f_idx, models, cfg)})
    report = {
        "recipe": {"path": str(cfg.recipe), "model": recipe.model.spec, "bits": recipe.plan.bits.label,
                   "method": recipe.provenance.get("method"), "plan_target": recipe.plan.target},
        "engine": {"path": str(cfg.engine), "target": meta["target"], "threads": engine.threads,
                   "versions": meta.get("versions", {})},
        "data": {"path": str(cfg.data), "count": int(len(idx)), "labelled": ds.labelled, "seed": cfg.seed},
        "quantsim_arithmetic": sim.arithmetic,
        "cpu_note": saturation_note([lp.weight.bits for lp in recipe.plan.layers], meta["target"]),
        "widths": layer_widths(recipe.plan),
        "accuracy": accuracy,
        "latency": benchmark_engines(engine, fp32_engine, cfg.bench_batch_sizes, cfg.bench_iters),
    }
    from qexport.verify.size import model_size

    report["model_size"] = model_size(recipe)
    report["checks"] = threshold_checks(accuracy, cfg.max_drop, cfg.min_agreement)
    if data_sets:
        _add_more_data(report, data_sets, {"path": str(cfg.data), "count": int(len(idx)), "labelled": ds.labelled,
                                           "accuracy": accuracy}, cfg)
    report["passed"] = all(c["passed"] for c in report["checks"])
    if cfg.divergence and not report["passed"]:
        from qexport.verify.divergence import first_divergent_layer

        report["divergence"] = first_divergent_layer(cfg.engine, recipe, sim, ds, idx[: min(len(idx), 64)])
    from qexport.verify.report import write_report

    with atomic_dir(out, force=cfg.force) as tmp:
        write_report(report, tmp)
    return report, out


def _reference_sims(recipe, folded, meta: dict):
    """The QuantSim the engine is compared with, and the float QuantSim kept beside it (or None).

    The reference is QuantSim computing what the engine's integer kernels compute, where it can (that includes
    their int16 pair saturation on CPUs without VNNI); the float QuantSim (exact accumulation) is kept alongside
    for comparison. Where no integer arithmetic is emulated, the float QuantSim is the reference, with this
    CPU's pair saturation when its kernels have it.

    Returns:
        ``(reference sim, float sim or None)``.
    """
    sim = recipe.build_quantsim(folded).set_exact_accumulation(True)
    arithmetic = engine_arithmetic_for(meta, recipe)
    if arithmetic is not None:
        return recipe.build_quantsim(folded).set_exact_accumulation(True).set_engine_arithmetic(arithmetic), sim
    if pairs_saturate(meta["target"]):
        sim.set_pair_saturation(meta["target"])
    return sim, None


def _add_more_data(report: dict, data_sets: list[dict], first: dict, cfg: VerifyConfig) -> None:
    """Record the extra ``--data`` folders: every set's accuracy, the mean of the extra ones, their checks."""
    report["data_sets"] = [first] + data_sets
    report["more_data_mean"] = _mean_accuracy([d["accuracy"] for d in data_sets])
    for d in data_sets:
        for c in threshold_checks(d["accuracy"], cfg.max_drop, cfg.min_agreement):
            report["checks"].append({**c, "name": f"{c['name']} on {Path(d['path']).name}"})


def _evaluate(ds, idx: list[int], models: dict, cfg: VerifyConfig) -> dict:
    """Logits of every model on one image folder, then :func:`accuracy_metrics`.

    Args:
        ds: the ImageFolder.
        idx: which images.
        models: name -> callable (torch modules take tensors, engines numpy arrays) or None.
        cfg: options (batch size, quiet).

    Returns:
        The accuracy metrics of that folder.
    """
    from qexport.data import iter_batches

    logits = {k: [] for k, m in models.items() if m is not None}
    labels = []
    steps = (len(idx) + cfg.batch_size - 1) // cfg.batch_size
    with torch.no_grad(), progress_bar(steps, f"verify {Path(ds.root).name}", cfg.quiet) as bar:
        for x, y in iter_batches(ds, cfg.batch_size, idx):
            xn = x.numpy().astype(np.float32)
            for k in logits:
                out = models[k](xn) if k in ("engine", "fp32_engine") else models[k](x).numpy()
                logits[k].append(out)
            labels.append(y.numpy())
            bar.advance(1)
    L = {k: np.concatenate(v) for k, v in logits.items() if v}
    y = np.concatenate(labels)
    return accuracy_metrics(L, y if ds.labelled else None)


def _mean_accuracy(rows: list[dict]) -> dict:
    """Mean of every numeric metric present in all rows (e.g. top-1 over corruptions)."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and all(k in r for r in rows)]
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def engine_arithmetic_for(meta: dict, recipe) -> str | None:
    """The engine integer arithmetic QuantSim can compute for an engine, if any.

    It applies when the export target's descriptor names one, the recipe's plan is that target's, the engine
    was built by one of the target's runtimes, and the CPU's kernels are emulated (x86-64).

    Args:
        meta: the engine's ``engine.json``.
        recipe: the QuantRecipe.

    Returns:
        The name for ``QuantSim.set_engine_arithmetic`` or None.
    """
    from qexport.quant.engine_arith import emulated_here
    from qexport.quant.targets import get_target

    export_target = (meta.get("source_metadata") or {}).get("qexport.target") or recipe.plan.target
    target = get_target(export_target)
    if (target.integer_arithmetic is None or recipe.plan.target != export_target
            or meta.get("target") not in target.runtimes or not emulated_here()):
        return None
    return target.integer_arithmetic


def accuracy_metrics(L: dict[str, np.ndarray], labels: np.ndarray | None) -> dict:
    """Top-1 of each model, engine vs QuantSim agreement and logit differences.

    Args:
        L: name -> logits (N, classes): ``fp32``, ``quantsim``, ``engine`` and optionally ``fp32_engine`` and
            ``quantsim_float`` (the float QuantSim when ``quantsim`` computes the engine's integer arithmetic).
        labels: int labels, or None when unlabelled.

    Returns:
        The accuracy part of the report.
    """
    pred = {k: v.argmax(axis=1) for k, v in L.items()}
    diff = np.abs(L["engine"] - L["quantsim"])
    out = {"engine_vs_quantsim_agreement": float((pred["engine"] == pred["quantsim"]).mean()),
           "quantsim_vs_fp32_agreement": float((pred["quantsim"] == pred["fp32"]).mean()),
           "logit_abs_diff_mean": float(diff.mean()), "logit_abs_diff_max": float(diff.max()),
           "disagreements": int((pred["engine"] != pred["quantsim"]).sum())}
    if "quantsim_float" in L:
        dfl = np.abs(L["engine"] - L["quantsim_float"])
        out.update({"engine_vs_quantsim_float_agreement": float((pred["engine"] == pred["quantsim_float"]).mean()),
                    "logit_abs_diff_mean_vs_quantsim_float": float(dfl.mean()),
                    "logit_abs_diff_max_vs_quantsim_float": float(dfl.max()),
                    "disagreements_vs_quantsim_float": int((pred["engine"] != pred["quantsim_float"]).sum())})
    if labels is not None:
        for k in pred:
            out[f"{k}_top1"] = float((pred[k] == labels).mean())
        out["top1_drop_points"] = 100.0 * (out["fp32_top1"] - out["engine_top1"])
    return out


def benchmark_engines(engine, fp32_engine, batch_sizes, iters: int) -> list[dict]:
    """Time the INT8 and FP32 engines interleaved in this process at each batch size.

    Args:
        engine: INT8 runner.
        fp32_engine: FP32 runner or None.
        batch_sizes: batch sizes to time.
        iters: timed calls per engine and batch size.

    Returns:
        One row per batch size with ``int8``, ``fp32`` (LatencyStats dicts) and ``speedup``.
    """
    from qexport.latency import interleaved_compare

    rows = []
    for b in batch_sizes:
        calls = {"int8": engine.timed_call(b)}
        if fp32_engine is not None:
            calls["fp32"] = fp32_engine.timed_call(b)
        stats = interleaved_compare(calls, rounds=iters, warmup=5, batch_size=b)
        row = {"batch_size": b, **{k: v.to_dict() for k, v in stats.items()}}
        if "fp32" in stats:
            row["speedup"] = stats["fp32"].p50_ms / stats["int8"].p50_ms
        rows.append(row)
    return rows


def threshold_checks(acc: dict, max_drop: float | None, min_agreement: float | None) -> list[dict]:
    """Gate checks for deployment pipelines.

    Args:
        acc: the accuracy metrics.
        max_drop: largest allowed top-1 drop (points) of the engine vs FP32.
        min_agreement: smallest allowed engine vs QuantSim agreement (percent).

    Returns:
        A list of {name, value, threshold, passed}.
    """
    checks = []
    if max_drop is not None:
        if "top1_drop_points" not in acc:
            raise QexportError("--max-drop needs labelled images (class subfolders) to measure top-1")
        checks.append({"name": "top-1 drop vs FP32 (points)", "value": acc["top1_drop_points"],
                       "threshold": max_drop, "passed": acc["top1_drop_points"] <= max_drop})
    if min_agreement is not None:
        v = 100.0 * acc["engine_vs_quantsim_agreement"]
        checks.append({"name": "engine vs QuantSim agreement (%)", "value": v, "threshold": min_agreement,
                       "passed": v >= min_agreement})
    return checks


def load_report(folder: Path) -> dict:
    """Read a report.json written by verify.

    Args:
        folder: the report folder.

    Returns:
        The report dictionary.
    """
    return json.loads((Path(folder) / "report.json").read_text())
