"""AlignQ's mathematics as standalone functions (methods.md section 4; supplement of paper 002).

- **Weight alignment.** ``u = 2 Phi((w - mean) / std) - 1 = erf((w - mean) / (std sqrt 2))`` maps a roughly normal
  tensor to roughly Uniform(-1, 1) (supplement Theorem 3.1); it is rounded on the uniform grid ``k / n`` with
  straight-through gradients. There is no mapping back: the network computes with the aligned integers, and a
  per-output-channel scale (what the following BN absorbs, folded here) carries the magnitude, so the deployed
  weight is ``q * scale`` with ``q`` integer, i.e. ordinary integer weights.
  ``n`` is the top level of the plan's signed k-bit grid, ``2^(k-1) - 1`` (7 at 4 bits): methods.md writes
  ``n = 2^k - 1`` for ``u`` in (-1, 1), which needs ``2^(k+1) - 1`` levels, one bit more than k.
- **Activation alignment** is the ``erf`` activation point (qexport/quant/aligned.py).
- **Correlation preservation** (supplement Theorem 3.2): per aligned point, ``D = C(after) - C(before)`` where
  ``C(x)`` is the N x N correlation matrix over the batch of the standardised, flattened features. ADMM with
  auxiliary ``Z`` and dual ``g`` keeps ``D`` small; see :class:`CorrelationADMM` for the exact objective.

The reference code's defects are not copied: here every option acts (the optimizer is the trainer's plain SGD,
whose gradient is used), and the non-ADMM variant has no state to read.
"""

from __future__ import annotations

import math

import torch

from qexport.errors import QexportError
from qexport.quant.fake_quant import channel_view, round_ste
from qexport.quant.quantsim import WeightQuantizer

_EPS = 1e-8


def cdf_align(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """``2 Phi(z) - 1`` of the standardised tensor (per output channel or per tensor), differentiable.

    Args:
        w: weight tensor (output channels first).
        per_channel: standardise each output channel on its own (else the whole tensor).

    Returns:
        Values in (-1, 1), same shape as ``w``.
    """
    if per_channel:
        flat = w.reshape(w.shape[0], -1)
        mean = flat.mean(1).view(-1, *([1] * (w.dim() - 1)))
        std = flat.std(1, unbiased=False).view(-1, *([1] * (w.dim() - 1)))
    else:
        mean, std = w.mean(), w.std(unbiased=False)
    return torch.erf((w - mean) / (std * math.sqrt(2.0) + _EPS))


def aligned_levels(w: torch.Tensor, n: int, per_channel: bool = True) -> torch.Tensor:
    """Integer levels ``round(n * u)`` in ``[-n, n]`` of the aligned tensor (straight-through rounding).

    Args:
        w: weights.
        n: top level of the grid.
        per_channel: alignment statistics per output channel.

    Returns:
        Float tensor of integer values.
    """
    return torch.clamp(round_ste(cdf_align(w, per_channel) * n), -n, n)


def fit_channel_scale(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-output-channel least-squares scale ``<w, q> / <q, q>`` (the magnitude BN absorbs), strictly positive.

    Args:
        w: float weights.
        q: their integer levels.

    Returns:
        1-D scales.
    """
    wf, qf = w.reshape(w.shape[0], -1).double(), q.reshape(q.shape[0], -1).double()
    s = (wf * qf).sum(1) / (qf * qf).sum(1).clamp_min(_EPS)
    fallback = wf.abs().amax(1).clamp_min(_EPS) / max(float(qf.abs().max()), 1.0)
    return torch.where(s > 0, s, fallback).float()


class AlignedWeightQuantizer(WeightQuantizer):
    """A weight quantizer whose integers are the CDF-aligned levels (drop-in for a QuantSim layer's quantizer).

    ``int_weight`` returns the aligned levels, so a recipe captured from it holds ordinary integer weights with
    per-channel scales; the rebuilt QuantSim computes exactly ``q * scale``.

    Args:
        base: the layer's plain quantizer (grid and out-channel count).
        per_channel: alignment statistics per output channel (else per tensor).
    """

    def __init__(self, base: WeightQuantizer, per_channel: bool = True):
        super().__init__(base.spec, base.scale.numel())
        self.n = min(base.spec.qmax, -base.spec.qmin)  # symmetric grid [-n, n]
        if self.n < 1:
            raise QexportError(f"CDF weight alignment needs at least 2 bits, got {base.spec.bits}")
        self.per_channel = per_channel

    def init_scale(self, w: torch.Tensor) -> None:
        """Set the per-channel scale to the least-squares fit of the aligned levels to ``w``."""
        with torch.no_grad():
            self.scale.copy_(fit_channel_scale(w, aligned_levels(w, self.n, self.per_channel)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return aligned_levels(w, self.n, self.per_channel) * channel_view(self.scale, w.dim())

    def int_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The aligned integer levels (int8)."""
        with torch.no_grad():
            return aligned_levels(w, self.n, self.per_channel).to(torch.int8)


def correlation(x: torch.Tensor) -> torch.Tensor:
    """N x N correlation matrix over the batch of the flattened, row-standardised features.

    Args:
        x: (N, ...) features.

    Returns:
        (N, N) matrix with entries in [-1, 1] (1 on the diagonal for non-constant rows).
    """
    f = x.reshape(x.shape[0], -1).float()
    f = f - f.mean(1, keepdim=True)
    f = f / (f.norm(dim=1, keepdim=True) + _EPS)
    return f @ f.t()


def correlation_change(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``D = C(after) - C(before)`` for one quantizer (``before`` is treated as a constant).

    Args:
        before: features entering the quantizer.
        after: the aligned, quantized features.

    Returns:
        (N, N) matrix.
    """
    return correlation(after) - correlation(before.detach())


class CorrelationADMM:
    """ADMM for ``min f(theta) + mu ||Z||_F  s.t.  D(theta) / N = Z`` per aligned point (N: batch size).

    The augmented Lagrangian adds ``<g, D/N - Z> + rho/2 ||D/N - Z||_F^2`` to the task loss; :meth:`penalty` is
    that term (differentiable in D), :meth:`update` does the Z and dual steps after each optimizer step:
    ``V = D/N + g/rho``, ``Z = max(0, 1 - (mu/rho) / ||V||_F) V`` (the proximal step of ``mu ||Z||_F``, as in the
    reference), ``g += rho (D/N - Z)``. Dividing by N makes ``||D/N||_F`` the root-mean-square of D, so the paper's
    mu = 0.2 and rho = 0.3 mean the same for any batch size. Z and g are per point and need a fixed batch size
    (the trainer drops the last partial batch); a batch of another size skips the term.

    Args:
        mu: weight of ``||Z||_F``.
        rho: ADMM penalty.
    """

    def __init__(self, mu: float = 0.2, rho: float = 0.3):
        if not mu >= 0 or not rho > 0:
            raise QexportError(f"ADMM needs mu >= 0 and rho > 0, got mu={mu}, rho={rho}")
        self.mu, self.rho = float(mu), float(rho)
        self.z: dict[str, torch.Tensor] = {}
        self.g: dict[str, torch.Tensor] = {}

    def _fits(self, name: str, d: torch.Tensor) -> bool:
        if name not in self.z:
            self.z[name] = torch.zeros_like(d.detach())
            self.g[name] = torch.zeros_like(d.detach())
        return self.z[name].shape == d.shape

    def penalty(self, name: str, d: torch.Tensor) -> torch.Tensor:
        """``<g, D/N - Z> + rho/2 ||D/N - Z||^2`` for point ``name`` (0 for a batch of another size).

        Args:
            name: the point.
            d: its correlation change (N x N, with gradient).

        Returns:
            Scalar tensor.
        """
        if not self._fits(name, d):
            return d.new_zeros(())
        r = d / d.shape[0] - self.z[name]
        return (self.g[name] * r).sum() + 0.5 * self.rho * (r * r).sum()

    @torch.no_grad()
    def update(self, name: str, d: torch.Tensor) -> None:
        """Z (group soft threshold) and dual steps for point ``name`` after an optimizer step.

        Args:
            name: the point.
            d: its correlation change at this step.
        """
        if not self._fits(name, d):
            return
        dn = d.detach() / d.shape[0]
        v = dn + self.g[name] / self.rho
        norm = float(v.norm())
        thr = self.mu / self.rho
        self.z[name] = v * (1.0 - thr / norm) if norm > thr else torch.zeros_like(v)
        self.g[name] = self.g[name] + self.rho * (dn - self.z[name])

    def objective(self, name: str, d: torch.Tensor) -> float:
        """The monitored value ``mu ||Z||_F + penalty`` (what falls as ADMM converges)."""
        return float(self.mu * self.z[name].norm() + self.penalty(name, d.detach())) if name in self.z else 0.0

    def state_dict(self) -> dict:
        return {"mu": self.mu, "rho": self.rho, "z": {k: v.clone() for k, v in self.z.items()},
                "g": {k: v.clone() for k, v in self.g.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.mu, self.rho = float(state["mu"]), float(state["rho"])
        self.z = {k: v.clone() for k, v in state["z"].items()}
        self.g = {k: v.clone() for k, v in state["g"].items()}
