"""``--method ste``: quantization-aware training with straight-through gradients and learned step sizes (LSQ).

The baseline every QAT method is compared with at equal budget: the plan's quantizers as they are (any widths,
binary {-1, +1} at 1 bit), weights and biases trained through the straight-through estimator, and every step
size learned by its gradient (LSQ: per-output-channel weight scales, initialised by the L^3 search of the
``mse`` calibrator; per-tensor activation scales, initialised at the 99.999th percentile of a training subset).
LSQ's gradient scaling (1 / sqrt(N * Qp)) is left out: Adam, the default, normalises each parameter's step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qexport.calibrators import register_calibrator
from qexport.calibrators.base import set_weight_scales
from qexport.calibrators.qat import QATConfig, QATMethod, freeze_steps_and_snap, run_qat


@dataclass(frozen=True)
class SteConfig(QATConfig):
    """Options of ``ste``: the QAT trainer's (see qexport/calibrators/qat.py)."""


class SteMethod(QATMethod):
    """Straight-through QAT with learned weight and activation step sizes."""

    name = "ste"
    default_lr = {"adam": 1e-4, "sgd": 1e-3}

    def prepare(self, sim, ctx) -> list[dict]:
        set_weight_scales(sim, "mse")
        weights, others = [], []
        for layer in sim.layers().values():
            layer.weight.requires_grad_(True)
            weights.append(layer.weight)
            if layer.bias is not None:
                layer.bias.requires_grad_(True)
                others.append(layer.bias)
            layer.weight_quantizer.scale.requires_grad_(True)
            others.append(layer.weight_quantizer.scale)
        self._sim = sim
        return [{"params": weights, "decay": True}, {"params": others}]

    def after_step(self, progress: float) -> dict:
        with torch.no_grad():
            for layer in self._sim.layers().values():
                layer.weight_quantizer.scale.clamp_(min=1e-8)
        return {}

    def finalize(self, sim) -> dict:
        freeze_steps_and_snap(sim)
        return {}


@register_calibrator("ste", config=SteConfig, needs_data=True, needs_labels=True,
                     summary="QAT baseline: straight-through gradients, learned step sizes (LSQ), any widths")
def calibrate_ste(ctx, cfg: SteConfig) -> dict:
    """Train with straight-through gradients and learned step sizes (see the module docstring).

    Args:
        ctx: calibration context (``ctx.data_dir``: labelled training folder).
        cfg: options.

    Returns:
        Trainer metrics.
    """
    return run_qat(ctx, cfg, SteMethod())
