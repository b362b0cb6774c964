"""The public functions behind the CLI verbs: calibrate (model -> recipe folder).

Export, engine building and verification live in ``qexport.export``, ``qexport.runtimes`` and ``qexport.verify``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qexport.errors import QexportError
from qexport.fileio import atomic_dir, check_output_free
from qexport.progress import progress_bar
from qexport.quant.layer_bits import resolve_bits
from qexport.quant.spec import BitsConfig


@dataclass(frozen=True)
class CalibrateConfig:
    """Everything ``qexport calibrate`` needs.

    Args:
        model: model spec (``cifar:resnet20``, ``torchvision:resnet18``, ``pkg.mod:factory``, ``file.pt2``).
        output: recipe folder to write.
        method: calibrator name.
        bits: ``wNaM``.
        target: export target whose plan is used.
        weights: checkpoint path.
        data: calibration image folder (not for data-free methods).
        num_samples: calibration images taken (seeded subset).
        seed: the run's seed.
        first_last_bits: width of the first and last layer.
        keep_float: layers to leave in float.
        input_size, mean, std: preprocessing overrides.
        device: ``cpu``, ``cuda`` or ``auto``.
        force: overwrite an existing output.
        resume: continue an interrupted run from its checkpoint.
        quiet: no progress bars.
        options: method options (validated by the method's config).
        layer_bits: ``NAME=wNaM`` per-layer widths on top of ``bits`` (mixed precision).
        auto_bits: with ``bits="auto"``: the budget per-layer widths are chosen for (qexport/mixed/allocate.py).
    """

    model: str
    output: Path
    method: str = "mse"
    bits: str = "w8a8"
    target: str = "onnxruntime"
    weights: str | None = None
    data: str | None = None
    num_samples: int = 512
    seed: int = 0
    first_last_bits: int | None = None
    keep_float: tuple[str, ...] = ()
    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    device: str = "auto"
    force: bool = False
    resume: bool = False
    quiet: bool = False
    options: dict = field(default_factory=dict)
    layer_bits: tuple[str, ...] = ()
    auto_bits: object | None = None


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is available, else ``cpu``; validates explicit choices."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QexportError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise QexportError(f"--device {device!r} is not understood; use auto, cpu or cuda")
    return device


def work_dir_for(output: Path) -> Path:
    """Persistent checkpoint folder of a run writing ``output`` (kept on interrupt, removed on success)."""
    return output.with_name(f".{output.name}.work")


def calibrate(cfg: CalibrateConfig) -> Path:
    """Calibrate a model and write its recipe folder atomically.

    Args:
        cfg: the run's configuration.

    Returns:
        The recipe folder.
    """
    from qexport.calibrators import get_calibrator
    from qexport.calibrators.base import CalibrationContext, config_from_options
    from qexport.data import ImageFolder, load_tensor
    from qexport.models import fold_batchnorm, load_model
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.recipe import ModelRef, QuantRecipe
    from qexport.training.distributed import barrier, init_from_env, shutdown

    info = get_calibrator(cfg.method)
    method_cfg = config_from_options(info.config, cfg.options, cfg.method)
    auto = cfg.bits.strip().lower() == "auto"
    if auto and cfg.auto_bits is None:
        raise QexportError("--bits auto needs a budget: --weight-bits-avg 4.5, --size-kb 100 or --act-bits-avg 6")
    if not auto and cfg.auto_bits is not None:
        raise QexportError("--weight-bits-avg, --act-bits-avg and --size-kb go with --bits auto")
    bits = BitsConfig(8, 8) if auto else resolve_bits(cfg.bits, cfg.layer_bits, cfg.first_last_bits)
    check_output_free(cfg.output, cfg.force)
    if cfg.num_samples <= 0:
        raise QexportError(f"--num-samples must be positive, got {cfg.num_samples}")
    if info.needs_data and cfg.data is None and bits.act_bits is not None:
        raise QexportError(f"--method {cfg.method} needs calibration images: pass --data DIR (an image folder)")
    if not info.needs_data and cfg.data is not None:
        raise QexportError(f"--method {cfg.method} is data-free and reads no images; drop --data")
    device = resolve_device(cfg.device)
    dist = init_from_env(device)  # under torchrun: join the group (one GPU per local rank); else rank 0 of 1
    device, quiet = dist.device, cfg.quiet or not dist.is_main
    torch.manual_seed(cfg.seed)

    loaded = load_model(cfg.model, cfg.weights, input_size=cfg.input_size, mean=cfg.mean, std=cfg.std)
    folded = fold_batchnorm(loaded.model)
    plan = build_plan(folded, cfg.target, bits, tuple(cfg.keep_float))
    data = labels = None
    data_fp = None
    if info.needs_data and cfg.data is not None:
        folder = ImageFolder(cfg.data, loaded.preprocess)
        count = min(cfg.num_samples, len(folder))
        with progress_bar(count, "loading calibration images", quiet) as bar:
            data, labels = load_tensor(folder, num_samples=cfg.num_samples, seed=cfg.seed,
                                       progress=lambda done, total: bar.update(completed=done))
        data_fp = folder.fingerprint()
    allocation = None
    if auto:
        from qexport.mixed.allocate import allocate_for_run

        bits, allocation = allocate_for_run(cfg.auto_bits, cfg.model, folded, cfg.target, data, cfg.seed,
                                            cfg.keep_float, cfg.quiet)
        plan = build_plan(folded, cfg.target, bits, tuple(cfg.keep_float))
    sim = QuantSim(folded, plan)
    work = work_dir_for(Path(cfg.output))
    if cfg.resume and not work.is_dir():
        raise QexportError(f"--resume: no interrupted run found for {cfg.output} (expected {work})")
    if not cfg.resume and work.is_dir() and dist.is_main:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    barrier(dist)
    started = time.time()
    ctx_args = dict(sim=sim, folded=folded, model=loaded, data=data, labels=labels, seed=cfg.seed, device=device,
                    quiet=quiet, work_dir=work, resume=cfg.resume, dist=dist)
    if not dist.is_main:  # the other ranks train alongside rank 0, which alone writes
        info.fn(CalibrationContext(**ctx_args), method_cfg)
        shutdown(dist)
        return Path(cfg.output)
    with atomic_dir(cfg.output, force=cfg.force) as tmp:
        ctx = CalibrationContext(**ctx_args, artifact_dir=tmp)
        try:
            metrics = info.fn(ctx, method_cfg) or {}
        except QexportError:
            if not any(work.iterdir()):  # refused before any checkpoint: leave nothing behind
                shutil.rmtree(work, ignore_errors=True)
            raise
        sim = ctx.sim.cpu().eval()
        metrics["calibration_seconds"] = round(time.time() - started, 2)
        if allocation is not None:
            metrics["mixed_precision"] = allocation
        ref = ModelRef(cfg.model, tuple(loaded.input_shape), loaded.preprocess.to_dict(), loaded.num_classes,
                       str(cfg.weights) if cfg.weights else None, loaded.weights_sha256)
        provenance = {"method": cfg.method, "options": _jsonable(vars(method_cfg)), "seed": cfg.seed,
                      "bits": bits.label, "target": cfg.target, "device": device,
                      "data": str(cfg.data) if data is not None else None, "data_fingerprint": data_fp,
                      "num_samples": int(data.shape[0]) if data is not None else 0}
        recipe = QuantRecipe.from_quantsim(sim, folded, ref, provenance, metrics)
        recipe.write_files(tmp)
    shutil.rmtree(work, ignore_errors=True)
    shutdown(dist)
    return Path(cfg.output)


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        out[k] = v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else str(v)
    return out
