"""Quantization-aware training (QAT): the trainer's options and how a QAT method plugs into it.

Every QAT method (``ste``, ``md``, ``alignq``...) trains the plan's QuantSim on a *labelled* training folder
with one trainer (:mod:`qexport.calibrators.qat_task`): seeded shuffling, the model family's augmentation
(:mod:`qexport.training.qat_data`), SGD or Adam, a cosine or step schedule, weight decay, label smoothing,
``--epochs`` or ``--time-budget``, a held-out share of the training folder for the progress bar (and, with
``select_epoch``, for choosing the final epoch), a checkpoint after every epoch, ``--resume``, Ctrl-C, and
DistributedDataParallel under ``torchrun`` (rank 0 writes).

BatchNorm is folded *before* training: the trained network is the deployed one (every recipe is BN-folded, and
the plan's quantizers sit on the folded graph, e.g. the conv outputs feeding residual Adds), so nothing changes
after training. For per-output-channel weight grids, folding after training would only rescale each channel's
scale, so the integer levels found are the same either way; the cost of folding first is the lost batch
normalisation of gradients, which matters for training from scratch, not for fine-tuning a trained network.

How a QAT method plugs in
-------------------------
Subclass :class:`QATMethod` and override the hooks you need, then register a calibrator that runs it::

    @dataclass(frozen=True)
    class MyConfig(QATConfig):          # trainer options are inherited; add the method's own fields
        strength: float = field(default=1.0, metadata={"help": "weight of the extra loss term"})

    class MyMethod(QATMethod):
        name = "mine"
        def prepare(self, sim, ctx):      # wrap or replace quantizers (layer.weight_quantizer = MyQuantizer(...))
            return [{"params": ..., "lr": ...}]   # optimizer parameter groups
        def extra_loss(self, sim, logits, labels):  # a loss term added to the cross-entropy (or None)
            ...
        def after_step(self, progress): ...        # annealing, projections; returns metrics for the bar
        def finalize(self, sim): ...               # hard projection: leave int * scale weights in ``sim``

    @register_calibrator("mine", config=MyConfig, needs_data=True, needs_labels=True, summary="...")
    def calibrate_mine(ctx, cfg):
        return run_qat(ctx, cfg, MyMethod(cfg))

A replacement weight quantizer is any module with ``forward(w) -> weight``, a per-channel ``scale`` (the int32
bias grid uses it), ``spec``, ``enabled`` and ``int_weight(w)``; put learnable tensors inside it (as
parameters) so DistributedDataParallel averages their gradients. :meth:`QATMethod.finalize` must leave plain
:class:`~qexport.quant.quantsim.WeightQuantizer` modules and weights equal to ``int * scale``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from qexport.duration import parse_duration
from qexport.errors import QexportError

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "step")
DEFAULT_EPOCHS = 3


def parse_fractions(text: str, what: str) -> tuple[float, ...]:
    """``"0.5,0.75"`` -> (0.5, 0.75), each in (0, 1), ascending.

    Args:
        text: comma-separated fractions.
        what: option name for messages.

    Returns:
        The fractions.
    """
    try:
        vals = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise QexportError(f"{what} {text!r} is not a list of fractions; use e.g. 0.5,0.75") from None
    if not vals or any(not 0 < v < 1 for v in vals) or list(vals) != sorted(vals):
        raise QexportError(f"{what} {text!r}: give ascending fractions of the run in (0, 1), e.g. 0.5,0.75")
    return vals


def freeze_steps_and_snap(sim) -> None:
    """End of training for methods that learn step sizes: stop their gradients and snap the weights to
    int * scale (the deployable state).

    Args:
        sim: the trained QuantSim.
    """
    for layer in sim.layers().values():
        layer.weight_quantizer.scale.requires_grad_(False)
    for aq in sim.act_quantizers().values():
        aq.scale.requires_grad_(False)
    sim.snap_weights()


@dataclass(frozen=True)
class QATConfig:
    """Options of the QAT trainer, shared by every QAT method (methods subclass it)."""

    epochs: Optional[int] = field(default=None, metadata={"help": f"Epochs over the training split (default {DEFAULT_EPOCHS} without --time-budget)."})
    time_budget: Optional[str] = field(default=None, metadata={"help": "Stop after this long (30m, 2h); the schedule follows elapsed time."})
    batch_size: int = field(default=128, metadata={"help": "Training batch size (per process under torchrun)."})
    optimizer: str = field(default="adam", metadata={"help": "adam or sgd (momentum 0.9, Nesterov off)."})
    lr: Optional[float] = field(default=None, metadata={"help": "Peak learning rate (default: the method's)."})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay on weights (never on scales or biases)."})
    schedule: str = field(default="cosine", metadata={"help": "cosine (to 0) or step (x step_gamma at step_milestones)."})
    step_milestones: str = field(default="0.5,0.75", metadata={"help": "step schedule: fractions of the run where lr drops."})
    step_gamma: float = field(default=0.1, metadata={"help": "step schedule: lr factor at each milestone."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the cross-entropy, in [0, 1)."})
    val_fraction: float = field(default=0.1, metadata={"help": "Held-out share of the training folder (progress, select_epoch), in [0, 0.5)."})
    select_epoch: bool = field(default=False, metadata={"help": "Keep the epoch with the best held-out top-1, not the last."})
    max_images: Optional[int] = field(default=None, metadata={"help": "Train on a seeded subset of this many images (default all)."})
    act_init_images: int = field(default=512, metadata={"help": "Training images used to initialise activation scales (percentile)."})
    learn_act_scales: bool = field(default=True, metadata={"help": "Learn activation step sizes (LSQ) during training."})
    distill: float = field(default=0.0, metadata={"help": "Weight of distillation from the float model, in [0, 1]: loss = (1-d) CE + d T^2 KL(float || quantized) (0: off)."})
    distill_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature T of the distillation term (> 0)."})

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs <= 0:
            raise QexportError(f"--epochs must be positive, got {self.epochs}")
        if self.time_budget is not None and (parse_duration(self.time_budget) or 0) <= 0:
            raise QexportError(f"--time-budget must be positive, got {self.time_budget!r}")
        if self.batch_size <= 0:
            raise QexportError(f"--batch-size must be positive, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise QexportError(f"--optimizer {self.optimizer!r}: choose {' or '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise QexportError(f"--schedule {self.schedule!r}: choose {' or '.join(SCHEDULES)}")
        parse_fractions(self.step_milestones, "--step-milestones")
        if self.lr is not None and not self.lr > 0:
            raise QexportError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise QexportError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise QexportError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.val_fraction < 0.5:
            raise QexportError(f"--val-fraction must be in [0, 0.5), got {self.val_fraction}")
        if self.max_images is not None and self.max_images <= 0:
            raise QexportError(f"--max-images must be positive, got {self.max_images}")
        if self.act_init_images <= 0:
            raise QexportError(f"--act-init-images must be positive, got {self.act_init_images}")
        if not 0 <= self.distill <= 1:
            raise QexportError(f"--distill must be in [0, 1] (the distillation term's weight), got {self.distill}")
        if not self.distill_temperature > 0:
            raise QexportError(f"--distill-temperature must be positive, got {self.distill_temperature}")
        if self.distill == 0 and self.distill_temperature != 1.0:
            raise QexportError("--distill-temperature has no effect without --distill; add --distill D (e.g. 0.5) "
                               "or drop the temperature")

    @property
    def budget_seconds(self) -> float | None:
        return parse_duration(self.time_budget)

    @property
    def planned_epochs(self) -> int | None:
        """Epochs to run: as given, the default without a time budget, None (until the budget) with one."""
        if self.epochs is not None:
            return self.epochs
        return None if self.time_budget else DEFAULT_EPOCHS


class QATMethod:
    """Hooks of one QAT method (see the module docstring). The base class trains nothing by itself.

    Attributes:
        name: method name (checkpoints record it).
        default_lr: peak lr when ``--lr`` is not given, per optimizer.
        act_scale_lr_factor: the learned activation step sizes train at this multiple of the peak lr.
    """

    name = "base"
    default_lr = {"adam": 1e-4, "sgd": 1e-3}
    act_scale_lr_factor = 1.0

    def prepare(self, sim, ctx) -> list[dict]:
        """Set up quantizers before training (initial scales, replacements) and name what is trained.

        Args:
            sim: the QuantSim; activation scales are initialised after this, on the network it leaves.
            ctx: the CalibrationContext.

        Returns:
            Optimizer parameter groups (dicts with ``params`` and optionally ``lr``/``weight_decay``).
        """
        return []

    def extra_loss(self, sim, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """A term added to the cross-entropy (None: none)."""
        return None

    def after_step(self, progress: float) -> dict:
        """Called after every optimizer step with the run's progress in [0, 1]; returns metrics to show."""
        return {}

    @contextlib.contextmanager
    def evaluating(self, sim) -> Iterator[None]:
        """Context for held-out scoring (e.g. hard projections); the default changes nothing."""
        yield

    def finalize(self, sim) -> dict:
        """Leave deployable weights (int * scale, plain WeightQuantizers) in ``sim``; returns metrics."""
        sim.snap_weights()
        return {}

    def state_dict(self) -> dict:
        """Method state beyond the QuantSim's parameters (e.g. annealing), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""


class FloatMethod(QATMethod):
    """Fine-tune the float (BN-folded) model with the same trainer: the reference of every QAT figure.

    All quantizers are disabled while training and scoring; the bench evaluates the float model it leaves.
    """

    name = "fp32"
    default_lr = {"adam": 1e-4, "sgd": 1e-3}

    def prepare(self, sim, ctx) -> list[dict]:
        for layer in sim.layers().values():
            layer.weight_quantizer.enabled = False
        for aq in sim.act_quantizers().values():
            aq.enabled = False
        ws = [p for n, p in sim.named_parameters() if n.endswith(".weight")]
        bs = [p for n, p in sim.named_parameters() if n.endswith(".bias")]
        for p in ws + bs:
            p.requires_grad_(True)
        return [{"params": ws, "decay": True}, {"params": bs}]

    def finalize(self, sim) -> dict:
        return {}


def run_qat(ctx, cfg: QATConfig, method: QATMethod) -> dict:
    """Train ``ctx.sim`` with ``method`` on the labelled training folder and finalize it (the calibrator body).

    Args:
        ctx: the CalibrationContext (``ctx.data_dir`` names the labelled training folder).
        cfg: trainer (and method) options.
        method: the QAT method.

    Returns:
        Metrics for the recipe.
    """
    from qexport.calibrators.qat_task import train

    return train(ctx, cfg, method)
