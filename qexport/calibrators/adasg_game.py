"""The players and losses of the AdaSG game: the conditional generator, the generator and student losses, the
teacher's BN-statistics hook, the EMA activation-range observer, and sampling helpers (see adasg.py)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class Generator(nn.Module):
    """Conditional ACGAN-style generator (the authors' CIFAR generator), size-generic.

    z (latent_dim) times a label embedding -> Linear -> 128 x s x s -> BN -> [upsample x2, conv3x3, BN(eps 0.8),
    LeakyReLU(0.2)] per stage (128 channels, the last 64) -> conv3x3 -> channels -> tanh -> BatchNorm(affine=False).
    For 32x32 that is the paper's two stages from 8x8; larger inputs get more stages (224: five, from 7x7), and
    sizes that do not divide are resized at the end.

    Args:
        num_classes: classes.
        channels: image channels.
        size: (H, W).
        latent_dim: latent size.
    """

    def __init__(self, num_classes: int, channels: int, size: tuple[int, int], latent_dim: int = 100):
        super().__init__()
        h, w = size
        n_up = 2
        while min(h, w) / 2**n_up > 8 and h % 2 ** (n_up + 1) == 0 and w % 2 ** (n_up + 1) == 0:
            n_up += 1
        self.size = (h, w)
        self.init = (max(1, math.ceil(h / 2**n_up)), max(1, math.ceil(w / 2**n_up)))
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.l1 = nn.Linear(latent_dim, 128 * self.init[0] * self.init[1])
        self.bn0 = nn.BatchNorm2d(128)
        blocks = []
        for i in range(n_up):
            cout = 64 if i == n_up - 1 else 128
            blocks += [nn.Upsample(scale_factor=2), nn.Conv2d(128, cout, 3, padding=1), nn.BatchNorm2d(cout, eps=0.8),
                       nn.LeakyReLU(0.2)]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(64, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.label_emb(labels) * z
        h = self.l1(h).view(z.shape[0], 128, *self.init)
        h = self.blocks(self.bn0(h))
        x = torch.tanh(self.out(h))
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.out_bn(x)


# -------------------------------------------------------------------------------------------------------- losses
def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy (nats) of softmax(logits)."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def normalized_entropy(h: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The paper's H' (Eq. 4): ``(H - min_batch H) / (log C - min_batch H)``, the batch minimum detached.

    Works for any batch size (the reference code hard-codes batch 16).
    """
    hmin = h.detach().min()
    return (h - hmin) / (math.log(num_classes) - hmin).clamp(min=1e-8)


def loss_ds(z_p: torch.Tensor, z_q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Disagreement-sample loss (Eq. 8): ``CE(softmax(z_p - z_q), y)``."""
    return F.cross_entropy(z_p - z_q, y)


def loss_as(z_p: torch.Tensor, z_q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Agreement-sample loss (Eq. 10): ``CE(softmax(z_p + z_q), y)``."""
    return F.cross_entropy(z_p + z_q, y)


def bound_loss(h_norm: torch.Tensor, lambda_l: float = 0.3, lambda_u: float = 0.8) -> torch.Tensor:
    """Bound loss (Eq. 12) on normalised entropies H': ``mean(max(l - H', 0)) + mean(max(H' - u, 0))``."""
    return F.relu(lambda_l - h_norm).mean() + F.relu(h_norm - lambda_u).mean()


def student_loss(z_p: torch.Tensor, z_q: torch.Tensor, tau: float) -> torch.Tensor:
    """Student loss (Eq. 15), in the reference code's form: ``tau^2 * mean(log C - H(softmax((z_p - z_q)/tau)))``.

    Equal to ``tau^2 log C * mean(1 - H/log C)``, i.e. the paper's ``1 - H'`` with H' normalised by the fixed
    maximum log C: the batch-minimum normalisation of Eq. 4 would divide the gradient by a near-zero, batch-dependent
    number at tau = 20 (all entropies are close to log C), so the reference maximises the plain entropy.
    """
    c = z_p.shape[1]
    return tau * tau * (math.log(c) - entropy((z_p - z_q) / tau)).mean()


def kd_loss(z_p: torch.Tensor, z_q: torch.Tensor, tau: float) -> torch.Tensor:
    """GDFQ student loss: ``tau^2 * KL(softmax(z_p/tau) || softmax(z_q/tau))`` (batch mean)."""
    return tau * tau * F.kl_div(F.log_softmax(z_q / tau, 1), F.log_softmax(z_p / tau, 1), reduction="batchmean",
                                log_target=True)


class BNStatsHook:
    """Forward hooks on every BatchNorm2d of the teacher: batch mean / biased variance of the input vs the running
    statistics; ``loss()`` is the mean over layers of (MSE(mean) + MSE(var)) (the reference code's reduction)."""

    def __init__(self, model: nn.Module):
        self.terms: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self.active = True

    def _hook(self, mod: nn.BatchNorm2d, inputs, output) -> None:
        if not self.active:
            return
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.terms.append(F.mse_loss(mean, mod.running_mean) + F.mse_loss(var, mod.running_var))

    def loss(self) -> torch.Tensor:
        out = torch.stack(self.terms).mean() if self.terms else torch.zeros(())
        self.terms = []
        return out

    def clear(self) -> None:
        self.terms = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class EMARange:
    """Activation-range observer: EMA of the per-batch min and max (first batch taken as is, no bias correction)."""

    def __init__(self, momentum: float):
        self.m = momentum
        self.min: float | None = None
        self.max: float | None = None

    def __call__(self, x: torch.Tensor) -> None:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if self.min is None:
            self.min, self.max = lo, hi
        else:
            self.min = self.m * self.min + (1 - self.m) * lo
            self.max = self.m * self.max + (1 - self.m) * hi


def generate_no_stats(G: Generator, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """G(z|y) with batch statistics (train mode) but without touching the BN running statistics."""
    saved = [(m, m.momentum) for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    for m, _ in saved:
        m.momentum = 0.0
    try:
        return G(z, y)
    finally:
        for m, mom in saved:
            m.momentum = mom


def generate_batches(G: Generator, y: torch.Tensor, latent_dim: int, gen: torch.Generator, bs: int = 64) -> torch.Tensor:
    """Images for labels ``y`` in batches (batch statistics, as in training; running stats untouched)."""
    xs = []
    for i in range(0, y.shape[0], bs):
        yy = y[i : i + bs]
        z = torch.randn(yy.shape[0], latent_dim, generator=gen)
        if yy.shape[0] == 1:  # batch statistics need two samples
            xs.append(generate_no_stats(G, torch.cat([z, z]), torch.cat([yy, yy]))[:1])
        else:
            xs.append(generate_no_stats(G, z, yy))
    return torch.cat(xs)


def save_grid(x: torch.Tensor, preprocess, rows: int, cols: int, path: Path) -> None:
    """A PNG grid: one row per class, ``cols`` samples each, de-normalised with ``preprocess``."""
    from PIL import Image

    mean = torch.tensor(preprocess.mean).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std).view(1, -1, 1, 1)
    pix = ((x.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    n, c, h, w = pix.shape
    pad = 2
    grid = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(min(n, rows * cols)):
        r, k = divmod(i, cols)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = pix[i]
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    if h < 64:  # small inputs: enlarge for a person to look at
        img = img.resize((img.width * 3, img.height * 3), Image.NEAREST)
    img.save(path)
