"""Options of ``--method adasg``: the paper and budget schedules, and duration parsing for ``--time-budget``."""

from __future__ import annotations

from dataclasses import dataclass, field

from qexport.duration import parse_duration  # noqa: F401  (re-exported: the options parse durations)
from qexport.errors import QexportError


@dataclass(frozen=True)
class AdaSGConfig:
    """Options of ``adasg`` (paper defaults; methods.md section 1). Each field's help is its CLI help
    (``qexport calibrate --method adasg --help``)."""

    schedule: str = field(default="budget", metadata={
        "help": "'paper' (400 epochs x 200 iterations, batch 16, 4 warm-up epochs, student lr 1e-4 decayed x0.1 "
                "at epochs 100/200/300) or 'budget' (a shorter run: --epochs/--iters-per-epoch/--time-budget set "
                "its length and the decay milestones are scaled to it)"})
    epochs: int | None = field(default=None, metadata={
        "help": "total epochs, warm-up included (none: 400 paper, 40 budget; with a time budget alone, as many as "
                "fit)"})
    iters_per_epoch: int | None = field(default=None, metadata={
        "help": "iterations per epoch (none: 200 paper, 50 budget)"})
    time_budget: str | None = field(default=None, metadata={
        "help": "wall-clock budget (30m, 2h, 1h30m, 90s): the epoch count is planned from the measured speed and "
                "the run stops when it is spent"})
    loss: str = field(default="adasg", metadata={"help": "'adasg' or the 'gdfq' baseline loss"})
    save_synthetic: int = field(default=0, metadata={
        "help": "also write this many synthetic images as an image folder in the recipe"})
    batch_size: int = field(default=16, metadata={
        "help": "synthetic images the generator draws per iteration (16 in the paper; at least 2)"})
    warmup_epochs: int | None = field(default=None, metadata={
        "help": "epochs where only the generator trains while activation ranges are observed (none: 4 paper, "
                "2 budget; 0 disables)"})
    alpha: float = field(default=0.1, metadata={"help": "weight of L_ds + L_as in the generator loss L_G"})
    beta: float = field(default=1.0, metadata={"help": "weight of the bound loss L_b in L_G"})
    gamma: float = field(default=1.0, metadata={"help": "weight of the BN-statistics loss L_BNS in L_G"})
    lambda_l: float = field(default=0.3, metadata={
        "help": "lower bound of the normalised disagreement entropy in L_b"})
    lambda_u: float = field(default=0.8, metadata={
        "help": "upper bound of the normalised disagreement entropy in L_b"})
    tau: float = field(default=20.0, metadata={"help": "student temperature"})
    lr_g: float = field(default=1e-3, metadata={"help": "generator Adam learning rate (betas 0.5/0.999)"})
    lr_q: float | None = field(default=None, metadata={
        "help": "student SGD-Nesterov learning rate (none: 1e-4, the paper's CIFAR rate; 1e-3 diverges within a "
                "few hundred iterations on ResNet-20 W4A4 with both losses)"})
    momentum: float = field(default=0.9, metadata={"help": "student SGD momentum"})
    weight_decay: float = field(default=1e-4, metadata={"help": "student SGD weight decay"})
    milestones: tuple[float, ...] | None = field(default=None, metadata={
        "help": "fractions of the run where the student lr is multiplied by gamma_lr, comma-separated (none: the "
                "paper's 0.25,0.5,0.75; budget runs 0.5,0.75, since a short run spends too little time at the "
                "first rate otherwise)"})
    gamma_lr: float = field(default=0.1, metadata={"help": "student lr decay factor at each milestone"})
    act_momentum: float = field(default=0.9, metadata={
        "help": "EMA momentum of the activation min/max during warm-up"})
    act_init: str = field(default="mse", metadata={
        "help": "activation ranges at the end of warm-up: 'mse' (the L^3-error clipping search over "
                "act_init_samples synthetic samples; chosen on held-out training images, "
                "bench/adasg_heldout_curve.py), 'percentile', or 'ema' (EMA of min/max during warm-up, the paper)"})
    act_init_samples: int = field(default=512, metadata={
        "help": "synthetic samples for the mse/percentile act_init"})
    weight_init: str = field(default="mse", metadata={"help": "'mse' or 'minmax' per-channel weight scales"})
    latent_dim: int = field(default=100, metadata={"help": "generator latent size"})
    grid_per_class: int = field(default=8, metadata={"help": "samples per class in the PNG grid of synthetic images"})
    bg_exact: bool = field(default=False, metadata={
        "help": "measure the disagreement R after the iteration on the same z, y (one more forward of G, P and Q "
                "per iteration); off: R after iteration t is the R of iteration t+1's batch (free, noisier)"})

    def __post_init__(self) -> None:
        if self.schedule not in ("paper", "budget"):
            raise QexportError(f"--schedule must be 'paper' or 'budget', got {self.schedule!r}")
        if self.loss not in ("adasg", "gdfq"):
            raise QexportError(f"--loss must be 'adasg' or 'gdfq', got {self.loss!r}")
        if self.epochs is not None and self.epochs <= 0:
            raise QexportError(f"--epochs must be positive, got {self.epochs}")
        if self.iters_per_epoch is not None and self.iters_per_epoch <= 0:
            raise QexportError(f"--iters-per-epoch must be positive, got {self.iters_per_epoch}")
        if self.batch_size < 2:
            raise QexportError(f"--batch-size must be at least 2 for AdaSG (batch statistics), got {self.batch_size}")
        if self.save_synthetic < 0:
            raise QexportError(f"--save-synthetic must be >= 0, got {self.save_synthetic}")
        if not 0.0 <= self.lambda_l < self.lambda_u <= 1.0:
            raise QexportError(f"need 0 <= lambda_l < lambda_u <= 1, got {self.lambda_l}, {self.lambda_u}")
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise QexportError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.act_init not in ("ema", "mse", "percentile"):
            raise QexportError(f"act_init must be ema, mse or percentile, got {self.act_init!r}")
        if self.weight_init not in ("mse", "minmax"):
            raise QexportError(f"weight_init must be mse or minmax, got {self.weight_init!r}")
        budget = parse_duration(self.time_budget)
        if budget is not None and budget <= 0:
            raise QexportError(f"--time-budget must be positive, got {self.time_budget!r}")

    @property
    def warmup(self) -> int:
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return 4 if self.schedule == "paper" else 2

    @property
    def milestone_fractions(self) -> tuple[float, ...]:
        if self.milestones is not None:
            return tuple(self.milestones)
        return (0.25, 0.5, 0.75) if self.schedule == "paper" else (0.5, 0.75)

    @property
    def budget_seconds(self) -> float | None:
        return parse_duration(self.time_budget)

    def resolved(self) -> tuple[int | None, int, float]:
        """(epochs or None when a time budget plans them, iterations per epoch, student lr)."""
        paper = self.schedule == "paper"
        ipe = self.iters_per_epoch or (200 if paper else 50)
        lr_q = self.lr_q if self.lr_q is not None else 1e-4
        if self.epochs is not None:
            epochs = self.epochs
        elif self.time_budget is not None:
            epochs = None
        else:
            epochs = 400 if paper else 40
        return epochs, ipe, lr_q
