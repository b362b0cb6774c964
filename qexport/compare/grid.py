"""``qexport compare``: every method x width x target through the real pipeline, resumable, one row per cell.

Layout of the output folder (everything kept, so a rerun reuses what is done and an interrupted comparison
resumes where it stopped):

    DIR/settings.json                         what the cells were computed with (a rerun must match)
    DIR/recipes/<method>_<bits>_<plan>/       one recipe per method x width x plan target (each target
                                              calibrates with its own plan, qexport/quant/targets.py)
    DIR/cells/<method>_<bits>_<target>/       model.onnx, model.fp32.onnx, engine/, report_<eval>/, cell.json
    DIR/compare.json, compare.md, *.png       rewritten at the end of every run

A cell is done when its ``cell.json`` exists; each step inside it (recipe, export, engine, each verify report)
is skipped when its output is already there. A failing cell records its one-line reason and the grid goes on;
failed cells are retried on the next run.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qexport.errors import QexportError
from qexport.fileio import write_text_atomic
from qexport.progress import progress_bar


@dataclass(frozen=True)
class CompareConfig:
    """Options of ``qexport compare`` (model and data flags mean what they mean for ``calibrate``)."""

    model: str = field(metadata={"help": "model spec"})
    output: Path = field(metadata={"help": "comparison folder (reused and resumed)"})
    methods: tuple[str, ...] = field(default=("minmax", "mse"), metadata={"help": "calibration methods"})
    bits: tuple[str, ...] = field(default=("w8a8",), metadata={"help": "widths wNaM"})
    targets: tuple[str, ...] = field(default=("onnxruntime",), metadata={"help": "runtimes"})
    eval_data: tuple[str, ...] = field(default=(), metadata={"help": "labelled evaluation folders"})
    weights: str | None = field(default=None, metadata={"help": "checkpoint"})
    data: str | None = field(default=None, metadata={"help": "calibration image folder"})
    num_samples: int = field(default=512, metadata={"help": "calibration images"})
    eval_samples: int | None = field(default=None, metadata={"help": "seeded subset of each eval folder"})
    method_options: dict = field(default_factory=dict, metadata={"help": "method -> {option: value}"})
    seed: int = field(default=0, metadata={"help": "seed"})
    threads: int | None = field(default=None, metadata={"help": "engine threads"})
    throughput_batch: int = field(default=32, metadata={"help": "batch size of the throughput measurement"})
    bench_iters: int = field(default=30, metadata={"help": "timed calls per engine and batch size"})
    force: bool = field(default=False, metadata={"help": "start the folder over"})
    quiet: bool = field(default=False, metadata={"help": "no progress display"})

    def __post_init__(self) -> None:
        for name, vals in (("--methods", self.methods), ("--bits", self.bits), ("--targets", self.targets),
                           ("--eval-data", self.eval_data)):
            if not vals:
                raise QexportError(f"{name} needs at least one value")
        if self.num_samples <= 0 or (self.eval_samples is not None and self.eval_samples <= 0):
            raise QexportError("--num-samples and --eval-samples must be positive")
        if self.throughput_batch < 1 or self.bench_iters < 1:
            raise QexportError("--throughput-batch and --bench-iters must be positive")


def eval_names(paths: tuple[str, ...]) -> list[str]:
    """Column names of the evaluation folders: their folder names, made unique."""
    names: list[str] = []
    for p in paths:
        base = Path(p).name or "eval"
        name, k = base, 2
        while name in names:
            name, k = f"{base}{k}", k + 1
        names.append(name)
    return names


def _plan_target(target: str) -> str:
    """The plan a cell's recipe is calibrated with: the target's own (qexport/quant/targets.py)."""
    return target


def validate(cfg: CompareConfig) -> dict:
    """Check every axis before anything runs (one-line errors); build each method's config.

    Returns:
        method -> its validated config object.
    """
    from qexport.calibrators import get_calibrator
    from qexport.calibrators.base import config_from_options
    from qexport.quant.spec import BitsConfig
    from qexport.runtimes import list_runtimes

    for b in cfg.bits:
        BitsConfig.parse(b)
    unknown = [t for t in cfg.targets if t not in list_runtimes()]
    if unknown:
        raise QexportError(f"--targets {', '.join(unknown)}: unknown runtime; known: {', '.join(list_runtimes())}")
    stray = sorted(set(cfg.method_options) - set(cfg.methods))
    if stray:
        raise QexportError(f"options given for {', '.join(stray)}, which --methods does not list")
    configs = {}
    for m in cfg.methods:
        info = get_calibrator(m)
        configs[m] = config_from_options(info.config, cfg.method_options.get(m, {}), m)
        if info.needs_data and cfg.data is None:
            raise QexportError(f"--methods {m} needs calibration images: pass --data DIR")
    for p in cfg.eval_data:
        if not Path(p).is_dir():
            raise QexportError(f"--eval-data {p} is not a folder")
    return configs


def settings_of(cfg: CompareConfig) -> dict:
    """What makes a cell's numbers: a rerun into the same folder must match these."""
    return {"model": cfg.model, "weights": cfg.weights, "data": cfg.data, "num_samples": cfg.num_samples,
            "seed": cfg.seed, "eval_data": list(cfg.eval_data), "eval_samples": cfg.eval_samples,
            "method_options": cfg.method_options, "threads": cfg.threads, "throughput_batch": cfg.throughput_batch,
            "bench_iters": cfg.bench_iters}


def _prepare_folder(cfg: CompareConfig) -> Path:
    out = Path(cfg.output)
    if cfg.force and out.exists():
        shutil.rmtree(out)
    settings = settings_of(cfg)
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in settings if old.get(k) != json.loads(json.dumps(settings[k])))
        if diff:
            raise QexportError(f"{out} holds a comparison made with other settings ({', '.join(diff)}); use "
                               f"another -o, or --force to start it over")
    elif out.exists() and any(out.iterdir()):
        raise QexportError(f"{out} exists and is not a qexport comparison; use another -o or --force")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(settings, indent=2) + "\n")
    return out


def run_compare(cfg: CompareConfig) -> tuple[list[dict], Path]:
    """Run (or resume) the grid and write compare.json, compare.md and the plots.

    Args:
        cfg: options.

    Returns:
        (one row per method x width x target, the output folder).
    """
    from qexport.compare.report import write_outputs

    validate(cfg)
    out = _prepare_folder(cfg)
    cells = [(m, b, t) for m in cfg.methods for b in cfg.bits for t in cfg.targets]
    rows = []
    started = time.time()
    with progress_bar(len(cells), "compare", cfg.quiet) as bar:
        for m, b, t in cells:
            bar.update(info=f"{m} {b} {t}")
            rows.append(_cell_or_failure(cfg, out, m, b, t, lambda step: bar.update(info=f"{m} {b} {t}: {step}")))
            bar.advance(1, info=f"{m} {b} {t}: {rows[-1]['status']}")
    write_outputs(rows, out, asdict_safe(cfg), eval_names(cfg.eval_data), round(time.time() - started, 1))
    return rows, out


def _cell_or_failure(cfg, out: Path, m: str, b: str, t: str, step) -> dict:
    from qexport.compare.cell import cell_dir, run_cell

    folder = cell_dir(out, m, b, t)
    done = folder / "cell.json"
    if done.is_file():
        row = json.loads(done.read_text())
        if row.get("status") == "ok":
            row["reused"] = True
            return row
    try:
        row = run_cell(cfg, out, m, b, t, step)
    except QexportError as e:
        row = _failed(m, b, t, str(e))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a method or runtime that breaks on this model: record it, go on
        first = (str(e).strip().splitlines() or [""])[0]
        row = _failed(m, b, t, f"{type(e).__name__}: {first}"[:300])
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(done, json.dumps(row, indent=2) + "\n")
    row["reused"] = False
    return row


def _failed(m: str, b: str, t: str, reason: str) -> dict:
    return {"method": m, "bits": b, "target": t, "status": "failed", "reason": reason}


def asdict_safe(cfg: CompareConfig) -> dict:
    """The config as JSON-able values (paths as strings)."""
    return json.loads(json.dumps(asdict(cfg), default=str))
