"""Baseline calibrators: ``minmax``, ``percentile`` and ``mse``. The init and yardstick of every method."""

from __future__ import annotations

from dataclasses import dataclass, field

from qexport.calibrators import register_calibrator
from qexport.calibrators.base import DEFAULT_PERCENTILE, CalibrationContext, calibrate_activations, set_weight_scales
from qexport.errors import QexportError


@dataclass(frozen=True)
class MinMaxConfig:
    """Options of ``minmax``: weights at max|w| per channel, activations at the observed range."""

    batch_size: int = field(default=64, metadata={"help": "images per forward pass while observing activation ranges"})

    def __post_init__(self) -> None:
        _check_batch(self.batch_size)


@dataclass(frozen=True)
class PercentileConfig:
    """Options of ``percentile``: weights min-max, activations clipped at a percentile of |x|."""

    percentile: float = field(default=DEFAULT_PERCENTILE, metadata={
        "help": "clip activations at this percentile of |x|, in (50, 100] (chosen on held-out training images, "
                "bench/percentile_heldout.py)"})
    batch_size: int = field(default=64, metadata={"help": "images per forward pass while observing activation ranges"})

    def __post_init__(self) -> None:
        _check_batch(self.batch_size)
        if not 50.0 < self.percentile <= 100.0:
            raise QexportError(f"--percentile must be in (50, 100], got {self.percentile}")


@dataclass(frozen=True)
class MSEConfig:
    """Options of ``mse``: weight and activation clipping that minimises the quantization error.

    The error is |x - q(x)|^p with p = 3 (``DEFAULT_ERROR_NORM``), not the plain square: see base.py for why.
    """

    batch_size: int = field(default=64, metadata={"help": "images per forward pass while observing activation ranges"})

    def __post_init__(self) -> None:
        _check_batch(self.batch_size)


def _check_batch(batch_size: int) -> None:
    if batch_size <= 0:
        raise QexportError(f"--batch-size must be positive, got {batch_size}")


def _finish(ctx: CalibrationContext, weights: str, acts: str, cfg, **kw) -> dict:
    set_weight_scales(ctx.sim, weights)
    if ctx.data is not None:
        calibrate_activations(ctx.sim, ctx.data, acts, batch_size=cfg.batch_size, quiet=ctx.quiet,
                              seed=ctx.seed, device=ctx.device, **kw)
    ctx.sim.snap_weights()
    return {"weights": weights, "activations": acts if ctx.sim.act_quantizers() else "float"}


@register_calibrator("minmax", config=MinMaxConfig, needs_data=True,
                     summary="min-max ranges: weights per channel, activations per tensor (baseline)")
def calibrate_minmax(ctx: CalibrationContext, cfg: MinMaxConfig) -> dict:
    """Min-max calibration.

    Args:
        ctx: calibration context (needs data when activations are quantized).
        cfg: options.

    Returns:
        Metrics for the recipe.
    """
    return _finish(ctx, "minmax", "minmax", cfg)


@register_calibrator("percentile", config=PercentileConfig, needs_data=True,
                     summary=f"activations clipped at a percentile of |x| (default {DEFAULT_PERCENTILE}), "
                             "weights min-max")
def calibrate_percentile(ctx: CalibrationContext, cfg: PercentileConfig) -> dict:
    """Percentile calibration.

    Args:
        ctx: calibration context.
        cfg: options.

    Returns:
        Metrics for the recipe.
    """
    return _finish(ctx, "minmax", "percentile", cfg, percentile=cfg.percentile)


@register_calibrator("mse", config=MSEConfig, needs_data=True,
                     summary="weight and activation clipping that minimises the quantization error (L^3)")
def calibrate_mse(ctx: CalibrationContext, cfg: MSEConfig) -> dict:
    """MSE calibration.

    Args:
        ctx: calibration context.
        cfg: options.

    Returns:
        Metrics for the recipe.
    """
    return _finish(ctx, "mse", "mse", cfg)
