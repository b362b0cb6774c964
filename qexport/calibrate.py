"""The public functions behind the CLI verbs: calibrate (model -> recipe folder).

Export, engine building and verification live in ``qexport.export``, ``qexport.runtimes`` and ``qexport.verify``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from qexport.device import resolve_device, work_dir_for  # noqa: F401  (part of this module's API)
from qexport.errors import QexportError
from qexport.fileio import atomic_dir, check_output_free
from qexport.progress import progress_bar
from qexport.quant.layer_bits import resolve_bits
from qexport.quant.spec import BitsConfig
from qexport.training.loop import Callbacks


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
        callbacks: named hooks of the training loop, passed to the calibrator as ``ctx.callbacks`` (benches and
            tests: e.g. score the model after every epoch); None: none.
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
    callbacks: Callbacks | None = None
    layer_bits: tuple[str, ...] = ()
    auto_bits: object | None = None


def calibrate(cfg: CalibrateConfig) -> Path:
    """Calibrate a model and write its recipe folder atomically.

    Args:
        cfg: the run's configuration.

    Returns:
        The recipe folder.
    """
    from qexport.calibrators import get_calibrator
    from qexport.calibrators.base import CalibrationContext
    from qexport.models import fold_batchnorm, load_model
    from qexport.options import build_config
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.training.distributed import barrier, init_from_env, shutdown

    info = get_calibrator(cfg.method)
    method_cfg = build_config(info.config, cfg.options, f"--method {cfg.method}")
    bits = _checked_bits(cfg, info)
    device = resolve_device(cfg.device)
    dist = init_from_env(device)  # under torchrun: join the group (one GPU per local rank); else rank 0 of 1
    device, quiet = dist.device, cfg.quiet or not dist.is_main
    torch.manual_seed(cfg.seed)

    loaded = load_model(cfg.model, cfg.weights, input_size=cfg.input_size, mean=cfg.mean, std=cfg.std)
    folded = fold_batchnorm(loaded.model)
    plan = build_plan(folded, cfg.target, bits, tuple(cfg.keep_float))
    heldout = _allocator_heldout(cfg, loaded, quiet)  # first: an unlabelled folder fails before any loading
    data, labels, data_fp = _calibration_data(cfg, info, loaded, quiet)
    if hasattr(method_cfg, "check_plan"):  # options that depend on the plan (e.g. md's levels vs the widths)
        method_cfg.check_plan(plan)
    allocation = None
    if cfg.auto_bits is not None:
        from qexport.mixed.allocate import allocate_for_run

        bits, allocation = allocate_for_run(cfg.auto_bits, cfg.model, folded, cfg.target, data, cfg.seed,
                                            cfg.keep_float, cfg.quiet, heldout)
        plan = build_plan(folded, cfg.target, bits, tuple(cfg.keep_float))
    sim = QuantSim(folded, plan)
    work = work_dir_for(Path(cfg.output))
    writer = dist.is_main  # under torchrun only rank 0 writes (work folder, recipe)
    _prepare_work_dir(work, cfg, writer)
    barrier(dist)
    started = time.time()
    with (atomic_dir(cfg.output, force=cfg.force) if writer else _scratch_dir()) as tmp:
        ctx = CalibrationContext(sim=sim, folded=folded, model=loaded, data=data, labels=labels, seed=cfg.seed,
                                 device=device, quiet=quiet, artifact_dir=tmp, work_dir=work,
                                 resume=cfg.resume, dist=dist,
                                 data_dir=Path(cfg.data) if info.needs_labels else None, callbacks=cfg.callbacks or Callbacks())
        try:
            metrics = info.fn(ctx, method_cfg) or {}
        except QexportError:
            if writer and work.is_dir() and not any(work.iterdir()):  # refused before any checkpoint: leave nothing
                shutil.rmtree(work, ignore_errors=True)
            raise
        metrics["calibration_seconds"] = round(time.time() - started, 2)
        if allocation is not None:
            metrics["mixed_precision"] = allocation
        recipe = _recipe(cfg, ctx, method_cfg, bits, metrics, (data, data_fp), labelled=info.needs_labels)
        if writer:
            recipe.write_files(tmp)
    if writer:
        shutil.rmtree(work, ignore_errors=True)
    shutdown(dist)
    return Path(cfg.output)


def _checked_bits(cfg: CalibrateConfig, info) -> BitsConfig:
    """The run's widths after the checks that need no model: budget flags, output, sample count, data flags.

    Returns:
        The uniform / per-layer widths (8/8 placeholders with ``--bits auto``, chosen later).

    Raises:
        QexportError: a flag combination or value that cannot run.
    """
    auto = cfg.bits.strip().lower() == "auto"
    if auto and cfg.auto_bits is None:
        raise QexportError("--bits auto needs a budget: --weight-bits-avg 4.5, --size-kb 100 or --act-bits-avg 6")
    if not auto and cfg.auto_bits is not None:
        from qexport.mixed.allocate import AUTO_ONLY_FLAGS

        raise QexportError(AUTO_ONLY_FLAGS)
    bits = BitsConfig(8, 8) if auto else resolve_bits(cfg.bits, cfg.layer_bits, cfg.first_last_bits)
    check_output_free(cfg.output, cfg.force)
    if cfg.num_samples <= 0:
        raise QexportError(f"--num-samples must be positive, got {cfg.num_samples}")
    if info.needs_data and cfg.data is None and bits.act_bits is not None:
        raise QexportError(f"--method {cfg.method} needs calibration images: pass --data DIR (an image folder)")
    if not info.needs_data and cfg.data is not None:
        raise QexportError(f"--method {cfg.method} is data-free and reads no images; drop --data")
    return bits


def _calibration_data(cfg: CalibrateConfig, info, loaded, quiet: bool):
    """The calibration images and labels the method gets, and the folder's fingerprint.

    QAT methods read their labelled folder themselves (all of it, augmented): only its labels are checked here.

    Returns:
        ``(images or None, labels or None, fingerprint or None)``.
    """
    from qexport.data import ImageFolder, load_tensor

    if info.needs_labels:
        if cfg.data is None:
            raise QexportError(f"--method {cfg.method} trains on labelled images: pass --data DIR (one subfolder per class)")
        from qexport.training.qat_data import check_labelled

        folder = ImageFolder(cfg.data, loaded.preprocess)
        check_labelled(folder, loaded.num_classes)
        return None, None, folder.fingerprint()
    if not info.needs_data or cfg.data is None:
        return None, None, None
    folder = ImageFolder(cfg.data, loaded.preprocess)
    count = min(cfg.num_samples, len(folder))
    with progress_bar(count, "loading calibration images", quiet) as bar:
        data, labels = load_tensor(folder, num_samples=cfg.num_samples, seed=cfg.seed,
                                   progress=lambda done, total: bar.update(completed=done))
    return data, labels, folder.fingerprint()


def _allocator_heldout(cfg: CalibrateConfig, loaded, quiet: bool):
    """``--allocator labels``: the labelled images right after the calibration subset (None for the others)."""
    if cfg.auto_bits is None or cfg.auto_bits.allocator != "labels" or cfg.data is None:
        return None
    from qexport.data import ImageFolder
    from qexport.mixed.sensitivity_run import load_heldout

    return load_heldout(ImageFolder(cfg.data, loaded.preprocess), cfg.num_samples, cfg.seed,
                        cfg.auto_bits.heldout_count, quiet=quiet, flag="--heldout-images")


def _prepare_work_dir(work: Path, cfg: CalibrateConfig, writer: bool) -> None:
    """Check ``--resume`` has a run to continue; a fresh run starts from an empty work folder (writer only)."""
    if cfg.resume and not work.is_dir():
        raise QexportError(f"--resume: no interrupted run found for {cfg.output} (expected {work})")
    if writer and not cfg.resume and work.is_dir():
        shutil.rmtree(work)
    if writer:
        work.mkdir(parents=True, exist_ok=True)


def _recipe(cfg: CalibrateConfig, ctx, method_cfg, bits: BitsConfig, metrics: dict, calibration: tuple,
            labelled: bool):
    """The recipe of the calibrated QuantSim, with the run's provenance.

    Args:
        cfg, ctx, method_cfg, bits, metrics: the run's configuration, context, method options, widths, metrics.
        calibration: ``(images given to the method or None, their folder's fingerprint or None)``.
        labelled: the method trained on the labelled folder itself.

    Returns:
        The QuantRecipe.
    """
    from qexport.options import config_record
    from qexport.recipe import ModelRef, QuantRecipe

    loaded, (data, data_fp) = ctx.model, calibration
    ref = ModelRef(cfg.model, tuple(loaded.input_shape), loaded.preprocess.to_dict(), loaded.num_classes,
                   str(cfg.weights) if cfg.weights else None, loaded.weights_sha256)
    provenance = {"method": cfg.method, "config": config_record(method_cfg), "seed": cfg.seed,
                  "bits": bits.label, "target": cfg.target, "device": ctx.device,
                  "data": str(cfg.data) if data is not None or labelled else None,
                  "data_fingerprint": data_fp,
                  "num_samples": int(data.shape[0]) if data is not None else metrics.get("train_images", 0),
                  "invocation": _invocation(cfg)}
    return QuantRecipe.from_quantsim(ctx.sim.cpu().eval(), ctx.folded, ref, provenance, metrics)


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    """A throw-away artifact folder for the ranks that do not write (torchrun rank > 0)."""
    with tempfile.TemporaryDirectory(prefix="qexport-rank-") as d:
        yield Path(d)


_REPLAYED = ("model", "method", "bits", "target", "weights", "data", "num_samples", "seed", "first_last_bits",
             "keep_float", "input_size", "mean", "std", "layer_bits")


def _invocation(cfg: CalibrateConfig) -> dict:
    """The settings ``--replay`` needs to rerun this calibration (method options live in ``config``)."""
    out = {}
    for name in _REPLAYED:
        v = getattr(cfg, name)
        out[name] = list(v) if isinstance(v, tuple) else v
    return out


def _read_provenance(recipe_dir: Path) -> dict:
    import json

    meta_path = Path(recipe_dir) / "recipe.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise QexportError(f"--replay {recipe_dir}: cannot read {meta_path} ({e}); pass a recipe folder") from None
    prov = meta.get("provenance") if isinstance(meta, dict) else None
    if not isinstance(prov, dict) or not isinstance(prov.get("invocation"), dict) or "config" not in prov:
        raise QexportError(f"--replay {recipe_dir}: the recipe does not record how it was made (written by an "
                           "older qexport); calibrate it again without --replay")
    return prov


def recipe_method(recipe_dir: Path) -> str | None:
    """The method a recipe was calibrated with (None when the folder cannot tell).

    Args:
        recipe_dir: the recipe folder.

    Returns:
        The method name or None.
    """
    try:
        method = _read_provenance(recipe_dir)["invocation"].get("method")
    except QexportError:
        return None
    return method if isinstance(method, str) else None


def replay_config(recipe_dir: Path, output: Path, *, force: bool = False, quiet: bool = False,
                  device: str = "auto", resume: bool = False) -> CalibrateConfig:
    """The CalibrateConfig that reruns a recipe's calibration: same model, method, options, bits, plan, seed, data.

    Args:
        recipe_dir: the recipe folder to replay.
        output: the new recipe folder.
        force: overwrite ``output``.
        quiet: no progress bars.
        device: where to run.
        resume: continue an interrupted replay.

    Returns:
        The config (its options are the recipe's typed method config, tuples restored).
    """
    from qexport.calibrators import get_calibrator
    from qexport.options import config_from_record

    prov = _read_provenance(recipe_dir)
    inv = prov["invocation"]
    missing = [k for k in _REPLAYED if k not in inv]
    if missing:
        raise QexportError(f"--replay {recipe_dir}: provenance.invocation lacks {', '.join(missing)}; recalibrate")
    if not isinstance(inv["method"], str):
        raise QexportError(f"--replay {recipe_dir}: provenance.invocation.method must be a method name")
    if inv["bits"] == "auto":
        raise QexportError(f"--replay {recipe_dir}: the recipe chose its widths with --bits auto; recalibrate it with "
                           "the same budget instead")
    info = get_calibrator(inv["method"])
    method_cfg = config_from_record(prov["config"], info.config, f"--replay {recipe_dir} (--method {info.name})")
    values = {f.name: getattr(method_cfg, f.name) for f in dataclasses.fields(method_cfg)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in inv.items() if k in _REPLAYED}
    try:
        return CalibrateConfig(output=Path(output), force=force, quiet=quiet, device=device, resume=resume,
                               options=values, **kw)
    except TypeError as e:
        raise QexportError(f"--replay {recipe_dir}: provenance.invocation is malformed ({e})") from None
