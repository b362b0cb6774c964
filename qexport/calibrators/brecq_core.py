"""The per-block pieces of BRECQ: AdaRound's learned rounding and the two reconstruction phases of one block.

Rounding (methods.md section 2): ``h(V) = clamp(1.2 sigmoid(V) - 0.1, 0, 1)``, the soft weight
``s * clamp(floor(W/s) + h(V), qmin, qmax)`` with the layer's per-channel scale ``s`` (kept fixed), ``V``
initialised so that ``h(V)`` equals the fractional part of ``W/s``. Regulariser ``lam * sum(1 - |2h - 1|^beta)``,
off during the first ``warmup`` of the iterations, then ``beta`` decays linearly from 20 to 2. Hard rounding at
the end is ``floor(W/s) + [V >= 0]`` (``h >= 0.5``), so the integers lie exactly on the grid.

Each phase is a small object with ``step() -> metrics``, ``state_dict()`` and ``load_state_dict()`` (the
shape of the shared training loop's steps, CONTRACTS.md item 2).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from qexport.quant.fake_quant import channel_view

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid: h = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)


class AdaRoundWeight(nn.Module):
    """Stand-in for a layer's WeightQuantizer while its rounding is learned.

    Args:
        wq: the layer's WeightQuantizer (its spec and per-channel scale are used, the scale is not changed).
        weight: the layer's float weight.
    """

    def __init__(self, wq: nn.Module, weight: torch.Tensor):
        super().__init__()
        self.spec, self.scale, self.enabled = wq.spec, wq.scale, True
        s = channel_view(wq.scale.detach(), weight.dim())
        x = weight.detach() / s
        self.register_buffer("floor", torch.floor(x))
        frac = (x - self.floor).clamp(1e-4, 1 - 1e-4)
        p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
        self.v = nn.Parameter(torch.log(p / (1 - p)))
        self.hard = False

    def h(self) -> torch.Tensor:
        """The soft rounding offsets in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def levels(self) -> torch.Tensor:
        """Integer levels after hard rounding (float dtype, on the grid)."""
        q = self.floor + (self.v.detach() >= 0).to(self.floor.dtype)
        return q.clamp(self.spec.qmin, self.spec.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        s = channel_view(self.scale.detach(), w.dim())
        if self.hard:
            return self.levels() * s
        return torch.clamp(self.floor + self.h(), self.spec.qmin, self.spec.qmax) * s

    def regulariser(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2h - 1|^beta)``: zero when every offset is 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def beta_at(it: int, total: int, warmup: float, start: float = 20.0, end: float = 2.0) -> float | None:
    """The regulariser's beta at iteration ``it`` of ``total`` (None during warm-up: no regulariser).

    Args:
        it: iteration index (0-based).
        total: iterations of the phase.
        warmup: fraction of the iterations without regulariser.
        start: beta when the regulariser starts.
        end: beta at the last iteration.

    Returns:
        beta, or None in the warm-up.
    """
    w = int(warmup * total)
    if it < w:
        return None
    frac = (it - w) / max(total - w - 1, 1)
    return start + (end - start) * min(frac, 1.0)


def recon_loss(pred: torch.Tensor, target: torch.Tensor, fisher: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error of a block output, summed over channels and averaged over the rest (BRECQ's form).

    Args:
        pred: the quantized block's output.
        target: the float block's output.
        fisher: squared output gradients of the task loss (the Fisher-weighted form), or None.

    Returns:
        Scalar loss.
    """
    err = (pred - target).pow(2)
    if fisher is not None:
        err = err * fisher
    return err.sum(dim=1).mean() if err.dim() > 1 else err.mean()


class _Phase:
    """One optimisation phase of a block: batches drawn by a seeded generator, Adam on ``params``."""

    def __init__(self, block: nn.Module, xq: torch.Tensor, target: torch.Tensor, fisher: torch.Tensor | None,
                 params: list[nn.Parameter], lr: float, total: int, batch_size: int, seed: int, cosine: bool):
        self.block, self.xq, self.target, self.fisher = block, xq, target, fisher
        self.params, self.total, self.batch_size = params, max(total, 1), batch_size
        self.opt = torch.optim.Adam(params, lr=lr)
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=self.total, eta_min=0.0)
                      if cosine else None)
        self.gen = torch.Generator().manual_seed(seed)
        self.it = 0

    def _batch(self):
        idx = torch.randint(0, self.xq.shape[0], (min(self.batch_size, self.xq.shape[0]),), generator=self.gen)
        idx = idx.to(self.xq.device)
        fis = self.fisher[idx] if self.fisher is not None else None
        return self.xq[idx], self.target[idx], fis

    def extra_loss(self) -> tuple[torch.Tensor | None, dict]:
        return None, {}

    def after_step(self) -> None:
        pass

    def step(self, info=None) -> dict:
        """One Adam step on a random batch; returns the metrics (``rec``, and the regulariser when on).

        Args:
            info: the training loop's StepInfo (unused: the phase keeps its own schedule).
        """
        x, t, fis = self._batch()
        rec = recon_loss(self.block(x), t, fis)
        extra, metrics = self.extra_loss()
        loss = rec if extra is None else rec + extra
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.after_step()
        self.it += 1
        metrics["rec"] = float(rec.detach())
        return metrics

    def state_dict(self) -> dict:
        return {"it": self.it, "opt": self.opt.state_dict(), "gen": self.gen.get_state(),
                "params": [p.detach().clone() for p in self.params],
                "sched": self.sched.state_dict() if self.sched else None}

    def load_state_dict(self, state: dict) -> None:
        self.it = state["it"]
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        with torch.no_grad():
            for p, v in zip(self.params, state["params"]):
                p.copy_(v)
        if self.sched is not None and state["sched"] is not None:
            self.sched.load_state_dict(state["sched"])


class RoundingPhase(_Phase):
    """AdaRound on every layer of a block: reconstruction + lam * regulariser(beta(it))."""

    def __init__(self, block, xq, target, fisher, rounders: list[AdaRoundWeight], *, lr: float, total: int,
                 batch_size: int, seed: int, lam: float, warmup: float):
        super().__init__(block, xq, target, fisher, [r.v for r in rounders], lr, total, batch_size, seed, False)
        self.rounders, self.lam, self.warmup = rounders, lam, warmup

    def extra_loss(self):
        beta = beta_at(self.it, self.total, self.warmup)
        if beta is None:
            return None, {}
        reg = sum(r.regulariser(beta) for r in self.rounders)
        return self.lam * reg, {"reg": float(reg.detach()), "beta": beta}


class StepSizePhase(_Phase):
    """LSQ-style learning of the block's activation step sizes (weights already hard-rounded, cosine lr)."""

    def __init__(self, block, xq, target, fisher, scales: list[nn.Parameter], *, lr: float, total: int,
                 batch_size: int, seed: int, sync=None):
        super().__init__(block, xq, target, fisher, scales, lr, total, batch_size, seed, True)
        self.sync = sync

    def after_step(self) -> None:
        with torch.no_grad():
            for p in self.params:
                p.clamp_(min=1e-8)
        if self.sync is not None:  # points that share a learned point's scale follow it
            self.sync()


class ActivationDrop:
    """QDrop (Wei et al., ICLR 2022): while entered, each element leaving one of ``quantizers`` keeps its float
    value with probability ``prob`` instead of its fake-quantized one, so the weights are fitted to a mix of both
    and do not overfit one activation rounding pattern. Seeded; a no-op at ``prob`` 0.

    Args:
        quantizers: the activation quantizer modules of the block.
        prob: drop probability per element.
        seed: seed of the masks.
    """

    def __init__(self, quantizers: list[nn.Module], prob: float, seed: int):
        self.quantizers, self.prob = quantizers, prob
        self.gen = torch.Generator().manual_seed(seed)
        self.handles: list = []

    def _hook(self, module, inputs, output):
        keep_float = torch.rand(output.shape, generator=self.gen) < self.prob
        return torch.where(keep_float.to(output.device), inputs[0], output)

    def __enter__(self) -> "ActivationDrop":
        if self.prob > 0:
            self.handles = [q.register_forward_hook(self._hook) for q in self.quantizers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def soft_rounding_fraction(rounders: list[AdaRoundWeight]) -> float:
    """Share of offsets not yet within 1e-3 of 0 or 1 (how far the regulariser still has to push)."""
    tot = sum(r.v.numel() for r in rounders)
    soft = sum(int(((r.h() > 1e-3) & (r.h() < 1 - 1e-3)).sum()) for r in rounders)
    return soft / max(tot, 1)
