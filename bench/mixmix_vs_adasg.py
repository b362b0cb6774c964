"""Data-free W4A4 on ResNet-20 at equal time (issue 13): mixmix vs AdaSG, and which images feed brecq best.

Two comparisons, each a grid of cells run one after the other in this process; every cell goes the whole way
(calibrate -> QDQ ONNX -> ONNX Runtime engine -> verify on test-dev) and its result is saved as soon as it ends,
so a rerun with the same ``--out`` skips the cells already done (an interrupted comparison resumes).

    python bench/mixmix_vs_adasg.py --budget 30m --seeds 0,1             # mixmix (zoo R20+R32) vs AdaSG
    python bench/mixmix_vs_adasg.py --sources --synth-budget 10m --brecq-budget 10m   # zoo vs bns vs adasg vs real

``--sources``: the same brecq run (same budget and seed) on four calibration sets: images synthesized by the
zoo (ResNet-20 + ResNet-32, mixmix mode), by ResNet-20 alone (bns mode), by the generator of an AdaSG run
(``--save-synthetic``), all three with the same synthesis budget, and 1,024 real training images (the paper's
appendix C claim: the zoo closes most of the gap to real data). The AdaSG cell's time is both of its stages.
No cell reads a real image for calibration except ``real``; test-dev is only read by verify at the end.
Prints one JSON line per cell and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from bench_utils import cpu_seconds

from qexport.build_engine import build_engine_folder
from qexport.calibrate import CalibrateConfig, calibrate
from qexport.duration import parse_duration
from qexport.export.qdq import export_recipe
from qexport.fileio import write_text_atomic
from qexport.shared import cifar_checkpoint, cifar_images
from qexport.verify.compare import VerifyConfig, verify


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cells(args) -> list[dict]:
    """The grid: one dict per run (name, method, calibration data or None, options)."""
    zoo = f"cifar:resnet32={cifar_checkpoint(32)}"
    if not args.sources:
        out = []
        for seed in args.seeds:
            out.append({"name": f"mixmix-s{seed}", "method": "mixmix", "seed": seed, "data": None,
                        "options": {"zoo": (zoo,), "time_budget": args.budget}})
            out.append({"name": f"adasg-s{seed}", "method": "adasg", "seed": seed, "data": None,
                        "options": {"time_budget": args.budget}})
        return out
    synth, rec = parse_duration(args.synth_budget), parse_duration(args.brecq_budget)
    both = {"time_budget": f"{synth + rec:.0f}s", "synth_share": synth / (synth + rec)}
    seed = args.seeds[0]
    return [{"name": "zoo (mixmix R20+R32)", "method": "mixmix", "seed": seed, "data": None,
             "options": {"zoo": (zoo,), **both}},
            {"name": "bns (R20 alone)", "method": "mixmix", "seed": seed, "data": None,
             "options": {"synth_mode": "bns", **both}},
            {"name": "adasg generator (R20)", "method": "brecq", "seed": seed, "data": None,
             "options": {"time_budget": args.brecq_budget},
             "images_from": {"method": "adasg", "options": {"time_budget": args.synth_budget,
                                                             "save_synthetic": 1024}}},
            {"name": "real (1,024 training images)", "method": "brecq", "seed": seed,
             "data": str(cifar_images("train")), "options": {"time_budget": args.brecq_budget}}]


def _calibrate(ckpt: Path, output: Path, method: str, data, seed: int, options: dict, args) -> Path:
    """One ``calibrate`` of ResNet-20 at ``args.bits`` on 1,024 images of ``data`` (None: data-free)."""
    return calibrate(CalibrateConfig(model="cifar:resnet20", weights=str(ckpt), output=output, method=method,
                                     bits=args.bits, data=None if data is None else str(data), num_samples=1024,
                                     seed=seed, options=options, quiet=not args.progress, force=True))


def run_cell(cell: dict, run: Path, args) -> dict:
    """Calibrate, export, build and verify one cell; returns its figures. (``qexport.run.run_pipeline`` does the
    same four steps but neither times the calibration alone in CPU seconds nor sets the engine's threads.)"""
    ckpt, test = cifar_checkpoint(20), cifar_images("test-dev")
    t0, c0 = time.time(), cpu_seconds()
    data = cell["data"]
    if "images_from" in cell:  # a data-free first stage whose saved synthetic images calibrate the second
        first = cell["images_from"]
        data = _calibrate(ckpt, run / "images_from", first["method"], None, cell["seed"], first["options"], args)
        data = data / "synthetic"
    recipe = _calibrate(ckpt, run / "recipe", cell["method"], data, cell["seed"], cell["options"], args)
    secs, cpu = time.time() - t0, cpu_seconds() - c0
    qdq, _, _ = export_recipe(recipe, "onnxruntime", run / "model.onnx")
    engine = build_engine_folder(qdq, run / "engine", "onnxruntime", force=True)
    rep, _ = verify(VerifyConfig(engine=engine, recipe=recipe, data=test, report=run / "report",
                                 num_samples=args.eval_samples or None, threads=args.threads,
                                 bench_batch_sizes=(), quiet=True, force=True))
    a = rep["accuracy"]
    return {"name": cell["name"], "method": cell["method"], "seed": cell["seed"], "bits": args.bits,
            "options": {k: str(v) for k, v in cell["options"].items()},
            "fp32": round(100 * a["fp32_top1"], 2), "quantsim": round(100 * a["quantsim_top1"], 2),
            "engine": round(100 * a["engine_top1"], 2), "drop": round(a["top1_drop_points"], 2),
            "agreement": round(100 * a["engine_vs_quantsim_agreement"], 2),
            "calibration_s": round(secs), "calibration_cpu_s": round(cpu), "threads": args.threads}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="30m", help="calibration time per run (mixmix: synthesis + brecq)")
    ap.add_argument("--sources", action="store_true", help="zoo vs bns vs real images, each then the same brecq")
    ap.add_argument("--synth-budget", default="10m", help="--sources: synthesis time of the zoo and bns cells")
    ap.add_argument("--brecq-budget", default="10m", help="--sources: brecq time of every cell")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--seeds", default="0,1", type=lambda s: [int(v) for v in s.split(",")])
    ap.add_argument("--threads", type=int, default=1, help="torch and engine threads")
    ap.add_argument("--eval-samples", type=int, default=0, help="test-dev images verified (0: all 5,000)")
    ap.add_argument("--cells", default="", help="run only the cells whose name starts with one of these "
                                                "(comma-separated, e.g. adasg)")
    ap.add_argument("--progress", action="store_true", help="show the calibration progress bars")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench_out/mixmix_vs_adasg"
                                                           "[_sources])")
    args = ap.parse_args(argv)
    if cifar_checkpoint(20) is None or cifar_checkpoint(32) is None or cifar_images("test-dev") is None:
        print("shared folder with the CIFAR-10 checkpoints and images not found (QEXPORT_SHARED); nothing to measure")
        return 0
    torch.set_num_threads(args.threads)
    out = args.out or Path("bench_out") / ("mixmix_vs_adasg_sources" if args.sources else "mixmix_vs_adasg")
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    done = json.loads(results_file.read_text()) if results_file.exists() else {}
    wanted = tuple(c.strip() for c in args.cells.split(",") if c.strip())
    for i, cell in enumerate(cells(args)):
        if wanted and not cell["name"].startswith(wanted):
            continue
        if cell["name"] in done:
            _log(f"{cell['name']}: done before, kept")
            continue
        _log(f"{cell['name']}: calibrating ({cell['method']}, seed {cell['seed']})")
        done[cell["name"]] = run_cell(cell, out / f"cell{i}", args)
        print(json.dumps(done[cell["name"]]), flush=True)
        write_text_atomic(results_file, json.dumps(done, indent=1))
    print(f"\n{'run':32s} {'engine top-1':>12s} {'drop':>6s} {'agreement':>9s} {'calib s':>8s} {'CPU s':>7s}")
    for r in done.values():
        print(f"{r['name']:32s} {r['engine']:12.2f} {r['drop']:6.2f} {r['agreement']:9.2f} "
              f"{r['calibration_s']:8d} {r['calibration_cpu_s']:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
