"""A toy third-party calibrator with six options, found through the ``qexport.calibrators`` entry point.

``tests/qexport_toy_method-0.1.dist-info/entry_points.txt`` declares it exactly as a separate pip package would
(``[qexport.calibrators] toy = tests_support.toy_method``); ``tests/`` is on ``sys.path`` in the test run, so
``importlib.metadata`` finds it without installing anything. Nothing else in qexport names this module: that it
shows in ``qexport methods``, ``calibrate --help``, ``run``, ``--replay`` and the contract test is the point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qexport.calibrators import register_calibrator
from qexport.calibrators.base import CalibrationContext, calibrate_activations, set_weight_scales
from qexport.errors import QexportError


@dataclass(frozen=True)
class ToyConfig:
    """Options of ``toy``."""

    weight_mode: str = field(default="minmax", metadata={"help": "weight scales: minmax or mse"})
    weight_shrink: float = field(default=1.0, metadata={"help": "multiply the weight scales by this (<= 1 clips)"})
    act_mode: str = field(default="minmax", metadata={"help": "activation ranges: minmax, percentile or mse"})
    percentile: float | None = field(default=None, metadata={"help": "percentile for act_mode percentile"})
    batch_size: int = field(default=8, metadata={"help": "images per forward pass"})
    only_layers: tuple[str, ...] = field(default=(), metadata={"help": "layers the shrink applies to (empty: all)"})

    def __post_init__(self) -> None:
        if self.weight_mode not in ("minmax", "mse"):
            raise QexportError(f"weight_mode must be minmax or mse, got {self.weight_mode!r}")
        if not 0.0 < self.weight_shrink <= 1.0:
            raise QexportError(f"weight_shrink must be in (0, 1], got {self.weight_shrink}")
        if self.act_mode not in ("minmax", "percentile", "mse"):
            raise QexportError(f"act_mode must be minmax, percentile or mse, got {self.act_mode!r}")
        if self.batch_size <= 0:
            raise QexportError(f"batch_size must be positive, got {self.batch_size}")


@register_calibrator("toy", config=ToyConfig, needs_data=True, summary="toy plug-in method (tests only)",
                     contract_options={"weight_shrink": 0.9, "only_layers": ("conv2",), "batch_size": 4})
def calibrate_toy(ctx: CalibrationContext, cfg: ToyConfig) -> dict:
    """Baseline scales, then shrink some layers' weight scales.

    Args:
        ctx: calibration context.
        cfg: options.

    Returns:
        Metrics.
    """
    set_weight_scales(ctx.sim, cfg.weight_mode)
    for name, layer in ctx.sim.layers().items():
        if not cfg.only_layers or name in cfg.only_layers:
            with torch.no_grad():
                layer.weight_quantizer.scale.mul_(cfg.weight_shrink)
    if ctx.data is not None:
        kw = {"percentile": cfg.percentile} if cfg.percentile is not None else {}
        calibrate_activations(ctx.sim, ctx.data, cfg.act_mode, batch_size=cfg.batch_size, quiet=ctx.quiet,
                              seed=ctx.seed, device=ctx.device, **kw)
    ctx.sim.snap_weights()
    return {"shrunk": list(cfg.only_layers) or "all"}
