"""``--method alignq``: CDF-aligned quantization-aware training with ADMM correlation preservation (paper 002).

AlignQ trains a *different network* from the float one, one that deploys exactly on integer engines:

- every weight tensor is mapped through the normal CDF of its standardised values and rounded on a uniform grid
  (``AlignedWeightQuantizer``: integers ``round(n * erf(z / sqrt 2))``, per-channel scale; straight-through);
- every activation after a Conv-BN-ReLU becomes an aligned point ``Q(a * erf(x / sqrt 2))`` (an ``erf`` point
  of the plan: qexport/quant/aligned.py), exported as an Erf between Q/DQ pairs (or a table of codes);
- an ADMM term keeps the batch correlations of the aligned features close to those of the features entering the
  quantizer (qexport/calibrators/alignq_core.py, ``CorrelationADMM``; mu = 0.2, rho = 0.3 as in the paper).

It runs on the shared QAT trainer (qexport/calibrators/qat.py): labelled training folder, augmentation, schedule,
checkpoints, ``--resume``, torchrun. ``--no-admm`` and ``--no-cdf`` rerun the paper's ablation (``--no-cdf``
trains the plan's uniform quantizers, i.e. ``ste`` plus the ADMM term on the same points).

Deviation from methods.md, stated: weights use ``n = 2^(k-1) - 1`` (the plan's signed k-bit grid), not
``2^k - 1`` (which needs k + 1 bits for ``u`` in (-1, 1)); activations after the ReLU use the unsigned k-bit grid,
``n = 2^k - 1``. The per-channel scale of the aligned weights is learned (it is what the folded BN absorbs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qexport.calibrators import register_calibrator
from qexport.calibrators.alignq_bn import attach_channel_bn, fold_channel_bn
from qexport.calibrators.alignq_core import AlignedWeightQuantizer, CorrelationADMM, correlation_change
from qexport.calibrators.qat import QATConfig, QATMethod, freeze_steps_and_snap, run_qat
from qexport.errors import QexportError
from qexport.quant.aligned import DEFAULT_GAIN, align_plan, bn_layers, relu_points
from qexport.quant.quantsim import QuantSim, WeightQuantizer

ALIGN_CHOICES = ("both", "weights", "activations")
MAX_GAIN = 16.0


@dataclass(frozen=True)
class AlignQConfig(QATConfig):
    """Options of ``alignq``: the QAT trainer's plus the method's (paper defaults)."""

    gain: float = field(default=DEFAULT_GAIN, metadata={"help": "a: aligned activations are a*erf(x/sqrt2), in (-a, a); (0, 16]."})
    mu: float = field(default=0.2, metadata={"help": "ADMM: weight of ||Z||_F (the paper's mu), >= 0."})
    rho: float = field(default=0.3, metadata={"help": "ADMM: penalty rho of the augmented Lagrangian, > 0."})
    align: str = field(default="both", metadata={"help": "Which tensors are CDF-aligned: both, weights or activations."})
    per_channel: bool = field(default=True, metadata={"help": "Weight alignment statistics per output channel (else per tensor)."})
    admm: bool = field(default=True, metadata={"help": "ADMM correlation preservation (--no-admm: the paper's 'CDF only')."})
    cdf: bool = field(default=True, metadata={"help": "CDF alignment (--no-cdf: uniform quantizers, the paper's 'ADMM only')."})
    train_bn: bool = field(default=True, metadata={"help": "Train each aligned-weight layer with BatchNorm (batch statistics, as the paper), folded into its scale and bias at the end (--no-train-bn: the folded BN stays fixed)."})

    @classmethod
    def contract_options(cls) -> dict:
        """The contract test's tiny model has no Conv-BN-ReLU point to align: align the weights only."""
        return {"align": "weights"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.gain <= MAX_GAIN:
            raise QexportError(f"--gain must be in (0, {MAX_GAIN:g}], got {self.gain}")
        if not self.mu >= 0:
            raise QexportError(f"--mu must be >= 0, got {self.mu}")
        if not self.rho > 0:
            raise QexportError(f"--rho must be > 0, got {self.rho}")
        if self.align not in ALIGN_CHOICES:
            raise QexportError(f"--align {self.align!r}: choose one of {', '.join(ALIGN_CHOICES)}")
        if not self.cdf and not self.admm:
            raise QexportError("--no-cdf with --no-admm leaves nothing of AlignQ; use --method ste")

    @property
    def align_weights(self) -> bool:
        return self.cdf and self.align in ("both", "weights")

    @property
    def align_acts(self) -> bool:
        return self.cdf and self.align in ("both", "activations")


def aligned_quantsim(ctx, cfg: AlignQConfig) -> tuple[QuantSim, list[str]]:
    """The QuantSim of the aligned plan, and the points that are (or, with ``--no-cdf``, would be) aligned.

    Raises a one-line error for a model without BN before a ReLU point (naming the layers) or a target that
    cannot run Erf, before anything is trained or written.

    Args:
        ctx: the CalibrationContext (``ctx.sim.plan`` is the default plan, ``ctx.model.model`` the unfolded model).
        cfg: options.

    Returns:
        (QuantSim, point names).
    """
    plan = ctx.sim.plan
    if plan.bits.act_bits is None:
        if cfg.align_acts and cfg.align == "activations":
            raise QexportError("--align activations needs quantized activations (--bits wNaM)")
        return ctx.sim, []
    if not cfg.align_acts:  # ADMM only (or weights only): the ReLU points that alignment would take
        return ctx.sim, relu_points(plan, ctx.folded)
    aligned, names = align_plan(plan, ctx.folded, bn_layers(ctx.model.model), cfg.gain)
    return QuantSim(ctx.folded, aligned).to(next(ctx.sim.parameters()).device), names


class AlignQMethod(QATMethod):
    """AlignQ's hooks on the QAT trainer.

    Args:
        cfg: options.
        points: the activation points whose correlations ADMM preserves.
    """

    name = "alignq"
    default_lr = {"adam": 1e-4, "sgd": 1e-3}

    def __init__(self, cfg: AlignQConfig, points: list[str]):
        self.cfg, self.points = cfg, list(points)
        self.admm = CorrelationADMM(cfg.mu, cfg.rho) if cfg.admm and self.points else None
        self._seen: dict[str, torch.Tensor] = {}
        self._hooks: list = []

    def prepare(self, sim, ctx) -> list[dict]:
        from qexport.calibrators.base import set_weight_scales

        set_weight_scales(sim, "mse")  # the uniform grid's init (kept for --no-cdf and unaligned layers)
        weights, others = [], []
        bns = bn_layers(ctx.model.model) if self.cfg.align_weights and self.cfg.train_bn else {}
        for name, layer in sim.layers().items():
            if self.cfg.align_weights:
                wq = AlignedWeightQuantizer(layer.weight_quantizer, self.cfg.per_channel).to(layer.weight.device)
                wq.init_scale(layer.weight.detach())
                layer.weight_quantizer = wq
            if name in bns:
                others.extend(attach_channel_bn(layer, bns[name]).parameters())
            layer.weight.requires_grad_(True)
            weights.append(layer.weight)
            if layer.bias is not None:
                layer.bias.requires_grad_(True)
                others.append(layer.bias)
            layer.weight_quantizer.scale.requires_grad_(True)
            others.append(layer.weight_quantizer.scale)
        if self.admm is not None:
            aqs = sim.act_quantizers()
            for name in self.points:
                self._hooks.append(aqs[name].register_forward_hook(self._capture(name)))
        self._sim = sim
        return [{"params": weights, "decay": True}, {"params": others}]

    def _capture(self, name: str):
        def hook(mod, inp, out):
            if mod.training and torch.is_grad_enabled():
                self._seen[name] = correlation_change(inp[0], out)
        return hook

    def extra_loss(self, sim, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        if self.admm is None or not self._seen:
            return None
        return sum(self.admm.penalty(n, d) for n, d in self._seen.items())

    def after_step(self, progress: float) -> dict:
        out = {}
        if self.admm is not None and self._seen:
            rms = []
            for n, d in self._seen.items():
                self.admm.update(n, d)
                rms.append(float(d.detach().pow(2).mean().sqrt()))
            out["corr_rms"] = sum(rms) / len(rms)
            self._seen = {}
        with torch.no_grad():
            for layer in self._sim.layers().values():
                layer.weight_quantizer.scale.clamp_(min=1e-8)
        return out

    def finalize(self, sim) -> dict:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for layer in sim.layers().values():
            wq = layer.weight_quantizer
            if isinstance(wq, AlignedWeightQuantizer):  # leave the plan's plain quantizer with the aligned integers
                q, s = wq.int_weight(layer.weight.detach()), wq.scale.detach().clone()
                if hasattr(layer, "train_bn"):
                    q, s = fold_channel_bn(layer, q, s)
                plain = WeightQuantizer(wq.spec, s.numel()).to(s.device)
                layer.weight_quantizer = plain
                layer.set_quantized_weight(q, s)
        freeze_steps_and_snap(sim)
        return {"aligned_points": len([p for p in sim.plan.activations if p.kind == "erf"]),
                "aligned_weights": self.cfg.align_weights, "admm": self.admm is not None,
                "trained_bn": self.cfg.align_weights and self.cfg.train_bn}

    def state_dict(self) -> dict:
        return {"admm": self.admm.state_dict() if self.admm is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.admm is not None and state.get("admm"):
            self.admm.load_state_dict(state["admm"])


@register_calibrator("alignq", config=AlignQConfig, needs_data=True, needs_labels=True,
                     summary="QAT with CDF-aligned weights and Erf-aligned activations + ADMM correlation "
                             "preservation (deploys as integer weights and Erf)")
def calibrate_alignq(ctx, cfg: AlignQConfig) -> dict:
    """AlignQ on the QAT trainer (see the module docstring).

    Args:
        ctx: calibration context (``ctx.data_dir``: labelled training folder).
        cfg: options.

    Returns:
        Trainer metrics.
    """
    sim, points = aligned_quantsim(ctx, cfg)
    ctx.sim = sim
    return run_qat(ctx, cfg, AlignQMethod(cfg, points))
