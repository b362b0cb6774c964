"""Calibration images from pretrained models alone (no real image is read): BN-statistics inversion (``bns``)
and MixMix (``mixmix``: feature mixing over a model zoo + data mixing; methods.md section 2).

Images are optimised as pixels in [0, 1] at the target model's input size; every zoo model sees them through
its own preprocessing (resized to its input size, normalised with its mean/std). Per step: random flip, a
random shift and a mild colour jitter; for ``mixmix`` also data mixing (a resized copy of another image of the
batch pasted into a random box with edge ratio U(0.1, 0.4), the labels mixed by area). Loss per zoo model:
the BN-statistics loss (batch mean/variance at every BatchNorm input against its running statistics) and the
cross-entropy to the (mixed) label; the losses are normalised to 1 at the first step and weighted by learned
Kendall-style weights (``sum L_i / a_i^2 + a_i^2``, Adam lr 1e-3). With ``zoo_per_step`` k > 0 a step runs k
zoo models drawn at random (a sample of the sum over the zoo at a fraction of a step's cost). Adam (betas 0.5,
0.5) on the pixels, lr 0.25 with cosine decay, pixels clipped to [0, 1] after every update; inputs of at least
``half_res_min`` pixels spend the first half of the iterations at half resolution. ``bns`` is the single-model
baseline: the target model only, no data mixing, fixed equal loss weights.

Batched and budgeted: ``num_images`` in batches, ``iters`` per batch, an optional time budget split evenly over
the batches that remain. ``SynthesisRun`` does the work one batch at a time and keeps its state in a
checkpoint folder, so an interrupted run resumes at the next batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from qexport.errors import QexportError

MODES = ("mixmix", "bns")


@dataclass(frozen=True)
class SynthConfig:
    """Options of image synthesis (``qexport synthesize``, and the synthesis half of ``--method mixmix``)."""

    mode: str = field(default="mixmix", metadata={"help": "'mixmix' (zoo feature mixing + data mixing) or 'bns' "
                                                          "(the target model's BN statistics only)"})
    num_images: int = field(default=1024, metadata={"help": "images to synthesize"})
    iters: int = field(default=500, metadata={"help": "optimisation steps per batch (paper: 2500 + 2500)"})
    batch_size: int = field(default=64, metadata={"help": "images optimised together"})
    lr: float = field(default=0.25, metadata={"help": "Adam learning rate on the pixels (cosine decay)"})
    mix_prob: float = field(default=0.5, metadata={"help": "probability of data mixing at a step (mixmix)"})
    jitter: float = field(default=0.0625, metadata={"help": "random shift per step, as a fraction of the size"})
    half_res_min: int = field(default=128, metadata={"help": "inputs at least this large start at half resolution"})
    zoo_per_step: int = field(default=0, metadata={"help": "zoo models run per step, drawn at random (0: all; "
                                                           "fewer make each step cheaper)"})
    time_budget: str | None = field(default=None, metadata={"help": "cap for the synthesis, e.g. 15m"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QexportError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.num_images <= 0:
            raise QexportError(f"--num-images must be positive, got {self.num_images}")
        if self.iters <= 0:
            raise QexportError(f"--iters must be positive for synthesis, got {self.iters}")
        if self.batch_size <= 0:
            raise QexportError(f"--batch-size must be positive, got {self.batch_size}")
        if self.zoo_per_step < 0:
            raise QexportError(f"zoo_per_step must be 0 (all models) or positive, got {self.zoo_per_step}")
        if self.lr <= 0 or not 0.0 <= self.mix_prob <= 1.0 or not 0.0 <= self.jitter < 0.5:
            raise QexportError("synthesis needs lr > 0, mix_prob in [0, 1] and jitter in [0, 0.5)")
        from qexport.duration import parse_duration

        b = parse_duration(self.time_budget)
        if b is not None and b <= 0:
            raise QexportError(f"--time-budget must be positive, got {self.time_budget!r}")


class BNStats:
    """Hooks every BatchNorm2d of a model; ``loss()`` is the sum over layers of the distance of the batch
    mean and variance of its input from the layer's running statistics.

    Args:
        model: a float model with its BatchNorm layers (not folded).
        name: the model's name, for messages.
    """

    def __init__(self, model: nn.Module, name: str):
        self.terms: list[torch.Tensor] = []
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
        if not bns:
            raise QexportError(f"model {name} has no BatchNorm layers: the BN-statistics loss, the core of bns and "
                               "mixmix synthesis, would be missing (only cross-entropy would remain); synthesize "
                               "with models that have BatchNorm, or calibrate on real images")
        self.handles = [m.register_forward_hook(self._hook) for m in bns]

    def _hook(self, mod: nn.BatchNorm2d, inp, out) -> None:
        x = inp[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.terms.append(torch.norm(mean - mod.running_mean, 2) + torch.norm(var - mod.running_var, 2))

    def loss(self) -> torch.Tensor:
        out = torch.stack(self.terms).sum()
        self.terms = []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class ZooMember:
    """One model of the zoo: the float module (with BN), its preprocessing and its BN-statistics hooks."""

    name: str
    model: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    size: tuple[int, int]
    stats: BNStats

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model's logits for images given as pixels in [0, 1] (resized and normalised its own way)."""
        x = pixels
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.model((x - self.mean) / self.std)


def make_member(name: str, model: nn.Module, preprocess, device: str) -> ZooMember:
    """Wrap a loaded float model as a zoo member (eval mode, frozen, on ``device``).

    Args:
        name: for messages and provenance.
        model: the float model (BN layers kept).
        preprocess: its qexport Preprocess.
        device: torch device.

    Returns:
        The ZooMember.
    """
    model = model.to(device).eval().requires_grad_(False)
    c = preprocess.channels
    mean = torch.tensor(preprocess.mean, device=device).view(1, c, 1, 1)
    std = torch.tensor(preprocess.std, device=device).view(1, c, 1, 1)
    return ZooMember(name, model, mean, std, tuple(preprocess.input_shape[1:]), BNStats(model, name))


def paste_mix(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Data mixing: a resized copy of another image of the batch pasted into a random box of each image.

    Args:
        x: pixels (B, C, H, W).
        gen: seeded generator.

    Returns:
        (mixed images, permutation (whose image went into the box), area share of the box).
    """
    b, _, h, w = x.shape
    ratio = 0.1 + 0.3 * float(torch.rand((), generator=gen))
    bh, bw = max(1, round(h * ratio)), max(1, round(w * ratio))
    top = int(torch.randint(0, h - bh + 1, (), generator=gen))
    left = int(torch.randint(0, w - bw + 1, (), generator=gen))
    perm = torch.randperm(b, generator=gen).to(x.device)
    small = F.interpolate(x[perm], size=(bh, bw), mode="bilinear", align_corners=False)
    mixed = x.clone()
    mixed[:, :, top : top + bh, left : left + bw] = small
    return mixed, perm, (bh * bw) / (h * w)


def augment(x: torch.Tensor, gen: torch.Generator, jitter: float) -> torch.Tensor:
    """Per-step random horizontal flip, shift (roll) by up to ``jitter`` of the size and a mild colour jitter."""
    if float(torch.rand((), generator=gen)) < 0.5:
        x = x.flip(3)
    h, w = x.shape[-2:]
    dy, dx = (int(torch.randint(-int(jitter * s), int(jitter * s) + 1, (), generator=gen)) for s in (h, w))
    if dy or dx:
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    gain = 1.0 + 0.1 * (torch.rand(x.shape[0], 1, 1, 1, generator=gen) * 2 - 1).to(x.device)
    shift = 0.05 * (torch.rand(x.shape[0], x.shape[1], 1, 1, generator=gen) * 2 - 1).to(x.device)
    return x * gain + shift


def cosine_lr(base: float, it: int, total: int) -> float:
    """Cosine decay from ``base`` to 0 over ``total`` steps."""
    return 0.5 * base * (1 + math.cos(math.pi * it / max(total, 1)))


class SynthesisBatch:
    """One batch of images being optimised: a training-loop task (``step`` per iteration, ``result`` at the end).

    Args:
        zoo: the models (the first is the target).
        labels: target class per image.
        size: output size (H, W).
        cfg: options.
        gen: seeded generator (initial pixels, augmentation, mixing).
        iters: steps for this batch (the cosine lr and the half -> full resolution switch follow it).
        num_classes: classes of every zoo model.
    """

    def __init__(self, zoo: list[ZooMember], labels: torch.Tensor, size: tuple[int, int], cfg: SynthConfig,
                 gen: torch.Generator, iters: int, num_classes: int):
        self.zoo, self.cfg, self.gen, self.iters, self.size = zoo, cfg, gen, iters, size
        c = zoo[0].mean.shape[1]
        self.large = min(size) >= cfg.half_res_min
        self.switch = iters // 2 if self.large else 0
        start = (max(1, size[0] // 2), max(1, size[1] // 2)) if self.large else size
        self.pix = (torch.rand(labels.shape[0], c, *start, generator=gen).mul_(0.2).add_(0.4)
                    .to(labels.device).requires_grad_(True))
        self.alpha = torch.ones(2 * len(zoo), device=labels.device, requires_grad=True)
        self.opt = torch.optim.Adam([self.pix], lr=cfg.lr, betas=(0.5, 0.5))
        self.opt_a = torch.optim.Adam([self.alpha], lr=1e-3)
        self.norm = torch.full((2 * len(zoo),), float("nan"), device=labels.device)
        self.bn_first = torch.full((len(zoo),), float("nan"), dtype=torch.float64)
        self.bn_last = torch.full((len(zoo),), float("nan"), dtype=torch.float64)
        self.onehot = F.one_hot(labels, num_classes).float()
        self.it, self.total = 0, float("nan")

    def _members(self) -> list[int]:
        """This step's zoo models: all, or ``zoo_per_step`` of them drawn at random (each step's loss is then an
        unbiased sample of the sum over the zoo, at a fraction of its cost)."""
        k = self.cfg.zoo_per_step
        if k <= 0 or k >= len(self.zoo):
            return list(range(len(self.zoo)))
        return sorted(int(i) for i in torch.randperm(len(self.zoo), generator=self.gen)[:k])

    def _losses(self) -> tuple[torch.Tensor, list[int]]:
        """The BN-statistics and cross-entropy losses of this step's zoo models on the augmented batch, and the
        index of each loss (2 * model, 2 * model + 1)."""
        x, target = augment(self.pix, self.gen, self.cfg.jitter), self.onehot
        if self.cfg.mode == "mixmix" and float(torch.rand((), generator=self.gen)) < self.cfg.mix_prob:
            x, perm, area = paste_mix(x, self.gen)
            target = (1 - area) * self.onehot + area * self.onehot[perm]
        losses, index = [], []
        for i in self._members():
            logits = self.zoo[i].logits(x)
            losses += [self.zoo[i].stats.loss(), -(target * F.log_softmax(logits, dim=1)).sum(1).mean()]
            index += [2 * i, 2 * i + 1]
        return torch.stack(losses), index

    def _track_bn(self, raw: torch.Tensor, index: list[int]) -> None:
        """Keep each model's first and latest BN-statistics loss (and each loss's value at its first step, the
        normaliser)."""
        detached = raw.detach()
        fresh = torch.isnan(self.norm[index])
        self.norm[index] = torch.where(fresh, detached.clamp(min=1e-8), self.norm[index])
        for j, i in enumerate(index[0::2]):
            model = i // 2
            if torch.isnan(self.bn_first[model]):
                self.bn_first[model] = float(detached[2 * j])
            self.bn_last[model] = float(detached[2 * j])

    def step(self, info=None) -> dict:
        """One Adam step on the pixels (and, for mixmix, the loss weights); returns ``loss`` and ``bn``."""
        cfg, it = self.cfg, self.it
        if self.large and it == self.switch:  # half -> full resolution: upsample and restart the optimiser
            self.pix = F.interpolate(self.pix.detach(), size=self.size, mode="bilinear",
                                     align_corners=False).requires_grad_(True)
            self.opt = torch.optim.Adam([self.pix], lr=cfg.lr, betas=(0.5, 0.5))
        phase_it, phase_len = (it - self.switch, self.iters - self.switch) if it >= self.switch else (it, self.switch)
        for g in self.opt.param_groups:
            g["lr"] = cosine_lr(cfg.lr, phase_it, phase_len)
        raw, index = self._losses()
        self._track_bn(raw, index)
        scaled = raw / self.norm[index]
        alpha = self.alpha[index]
        total = (scaled / alpha.pow(2) + alpha.pow(2)).sum() if cfg.mode == "mixmix" else scaled.sum()
        self.opt.zero_grad(set_to_none=True)
        self.opt_a.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        if cfg.mode == "mixmix":
            self.opt_a.step()
        with torch.no_grad():
            self.pix.clamp_(0.0, 1.0)
        self.it += 1
        self.total = float(total.detach())
        return {"loss": self.total, "bn": float(self.bn_last.nansum())}

    def result(self) -> tuple[torch.Tensor, dict]:
        """(pixels (B, C, H, W) in [0, 1], metrics: BN loss at the first and last step, final total loss)."""
        return self.pix.detach(), {"bn_first": float(self.bn_first.nansum()),
                                   "bn_last": float(self.bn_last.nansum()), "loss_last": self.total,
                                   "iters": self.it}


def synthesize_batch(zoo: list[ZooMember], labels: torch.Tensor, size: tuple[int, int], cfg: SynthConfig,
                     gen: torch.Generator, iters: int, num_classes: int, on_step=None) -> tuple[torch.Tensor, dict]:
    """Optimise one batch of images (pixels in [0, 1]) with a bare loop (timing probes, benchmarks).

    Args:
        zoo, labels, size, cfg, gen, iters, num_classes: as :class:`SynthesisBatch`.
        on_step: called as ``on_step(it, metrics)``.

    Returns:
        :meth:`SynthesisBatch.result`.
    """
    task = SynthesisBatch(zoo, labels, size, cfg, gen, iters, num_classes)
    for it in range(iters):
        metrics = task.step()
        if on_step is not None:
            on_step(it, metrics)
    return task.result()
