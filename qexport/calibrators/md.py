"""``--method md``: mirror-descent quantization-aware training, binary / ternary / any level set (paper 003).

Each weight of a low-bit layer is ``w = s * P(u)`` with unconstrained auxiliary weights ``u`` (in units of the
per-output-channel scale ``s``) and a projection ``P`` onto the convex hull of the levels:

* MD-tanh-s, binary {-1, +1}: ``P(u) = tanh(beta * u)``;
* MD-tanh-s, ternary {-1, 0, +1}: ``P(u) = (tanh(beta * (u + 1/2)) + tanh(beta * (u - 1/2))) / 2``;
* MD-softmax-s, any level set ``Q`` (e.g. ``-2,-1,0,1``): a logit vector per weight,
  ``P(u) = sum_k softmax(beta * u)_k * q_k``.

The "-s" (numerically stable) update of the paper: the forward pass uses ``P(u)``, and the gradient with
respect to the projected weights is applied to ``u`` directly, without P's Jacobian (for softmax, the gradient
with respect to the level probabilities ``dL/dp_k = dL/dw * q_k`` is applied to the logits): a step in the
dual space. ``beta`` starts at ``beta_start`` (1; 20 for binary with ``anneal=run``) and grows -- by
``beta_growth`` every ``beta_every`` steps (``anneal=paper``: x1.02 every 200) or geometrically over the run
(``anneal=run``, for short budgets) -- and is capped at ``beta_max``. At the end the hard projection (sign for
binary; nearest level, i.e. thresholds at +-1/2, for ternary; argmax for softmax) gives integers that are
exactly the levels, times ``s``.

The scale ``s``: per output channel, initialised by the least-squares search of the nearest-level quantization
of the trained float weights over clip ratios, then *learned* by its exact gradient (``w = s * P(u)`` is
differentiable in ``s``; ``learn_scale=false`` keeps the initial one).

Layers at another width than the run's weight width (``--first-last-bits 8``: first and last) are trained as
``ste`` trains them (straight-through, learned step sizes). ``--bits w1a8``: binary; ``w2a8``: ternary; wider
widths: MD-softmax-s over every integer of the grid unless ``levels`` says otherwise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from qexport.calibrators import register_calibrator
from qexport.calibrators.qat import QATConfig, run_qat
from qexport.calibrators.ste import SteMethod
from qexport.errors import QexportError
from qexport.quant.fake_quant import channel_view
from qexport.quant.quantsim import WeightQuantizer

ANNEALS = ("run", "paper")
PROJECTIONS = ("auto", "tanh", "softmax")


def parse_levels(text: str) -> tuple[int, ...]:
    """``"-1,0,1"`` -> (-1, 0, 1): distinct integers, ascending, at least two.

    Args:
        text: comma-separated integers.

    Returns:
        The sorted levels.
    """
    try:
        vals = sorted({int(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        raise QexportError(f"--levels {text!r} is not a list of integers; use e.g. -1,0,1") from None
    if len(vals) < 2:
        raise QexportError(f"--levels {text!r}: give at least two distinct integer levels, e.g. -1,1")
    return tuple(vals)


@dataclass(frozen=True)
class MDConfig(QATConfig):
    """Options of ``md`` (trainer options inherited from QATConfig)."""

    lr: Optional[float] = field(default=None, metadata={"help": "Peak learning rate of u (default: Adam 1e-3 as the paper; scales take a tenth)."})
    levels: Optional[str] = field(default=None, metadata={"help": "Integer level set, e.g. -1,0,1 (default: binary at 1 bit, ternary at 2, the whole grid above)."})
    projection: str = field(default="auto", metadata={"help": "auto (tanh for binary/ternary, else softmax), tanh or softmax."})
    anneal: str = field(default="run", metadata={"help": "run: beta grows geometrically to beta_max over the run; paper: x beta_growth every beta_every steps."})
    beta_start: Optional[float] = field(default=None, metadata={"help": "Initial beta (default 1; 20 for binary weights with anneal=run, chosen on held-out training images)."})
    beta_max: float = field(default=100.0, metadata={"help": "Cap of beta."})
    beta_growth: float = field(default=1.02, metadata={"help": "anneal=paper: beta factor every beta_every steps."})
    beta_every: int = field(default=200, metadata={"help": "anneal=paper: steps between beta increases."})
    learn_scale: bool = field(default=True, metadata={"help": "Learn the per-channel scale s (else keep its least-squares init)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.levels is not None:
            parse_levels(self.levels)
        if self.projection not in PROJECTIONS:
            raise QexportError(f"--projection {self.projection!r}: choose one of {', '.join(PROJECTIONS)}")
        if self.anneal not in ANNEALS:
            raise QexportError(f"--anneal {self.anneal!r}: choose run or paper")
        start = self.beta_start if self.beta_start is not None else 1.0
        if not 0 < start <= self.beta_max:
            raise QexportError(f"need 0 < --beta-start <= --beta-max, got {start} and {self.beta_max}")
        if self.beta_growth < 1 or self.beta_every <= 0:
            raise QexportError("--beta-growth must be >= 1 and --beta-every positive")

    def start_beta(self, levels: tuple[int, ...]) -> float:
        """The initial beta for a run whose low-bit layers take ``levels``.

        Args:
            levels: the level set of the run-width layers.
        Returns:
            ``beta_start`` when given; else 1 (the paper's schedule, and ``run`` for every level set but binary)
            or, for binary {-1, +1} with ``anneal=run``, 20 (at most beta_max). Chosen on the trainer's held-out
            training images (docs/qat.md): binary after 30 minutes 76 % from 20 against 56 % from 1; ternary
            82 % from 20 against 85 % from 1 (at 5 minutes 20 led for both).
        """
        if self.beta_start is not None:
            return self.beta_start
        if self.anneal == "run" and tuple(levels) == (-1, 1):
            return min(20.0, self.beta_max)
        return 1.0

    def levels_for(self, spec) -> tuple[int, ...]:
        """The level set of a layer on grid ``spec``."""
        if self.levels is not None:
            return parse_levels(self.levels)
        if spec.binary:
            return (-1, 1)
        if spec.bits == 2:
            return (-1, 0, 1)
        return spec.grid()

    def kind_for(self, levels: tuple[int, ...]) -> str:
        """``tanh`` or ``softmax`` for a level set."""
        tanh_ok = levels in ((-1, 1), (-1, 0, 1))
        if self.projection == "tanh" and not tanh_ok:
            raise QexportError(f"--projection tanh takes the levels -1,1 or -1,0,1, not {levels}; use softmax")
        return "softmax" if self.projection == "softmax" or not tanh_ok else "tanh"

    def check_plan(self, plan) -> None:
        """Refuse a level set that does not fit the run's weight grid (before anything is written)."""
        for lp in plan.layers:
            if lp.weight.bits != plan.bits.weight_bits:
                continue
            lv = self.levels_for(lp.weight)
            if not lp.weight.holds(torch.tensor(lv)):
                grid = "binary grid {-1, +1}" if lp.weight.binary else f"{lp.weight.bits}-bit grid [{lp.weight.qmin}, {lp.weight.qmax}]"
                raise QexportError(f"--levels {','.join(map(str, lv))} do not fit the {grid} of --bits "
                                   f"{plan.bits.label}; choose levels inside it or wider --bits")
            self.kind_for(lv)


class _DualStep(torch.autograd.Function):
    """Forward: the projection's value; backward: the gradient passed to ``u`` unchanged (the "-s" step)."""

    @staticmethod
    def forward(ctx, u, value):
        return value

    @staticmethod
    def backward(ctx, g):
        return g, None


class MDWeight(nn.Module):
    """A weight quantizer replaced by mirror descent: ``forward`` returns ``s * P(u)`` (or the hard levels).

    Args:
        w: the layer's trained float weight.
        spec: the layer's weight grid.
        levels: the integer levels.
        kind: ``tanh`` or ``softmax``.
        beta: the initial beta.
    """

    def __init__(self, w: torch.Tensor, spec, levels: tuple[int, ...], kind: str, beta: float):
        super().__init__()
        self.spec, self.levels, self.kind = spec, levels, kind
        self.enabled, self.hard = True, False
        self.register_buffer("q", torch.tensor(levels, dtype=w.dtype))
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.scale = nn.Parameter(self._init_scale(w.detach()))
        x = w.detach() / channel_view(self.scale.detach(), w.dim())
        if kind == "tanh":  # start where the soft weight equals the float weight (clipped inside the hull)
            u = self._invert(x.clamp(-0.95, 0.95))
        else:  # logits: minus the squared distance to each level
            u = -((x.unsqueeze(0) - self.q.view(-1, *([1] * w.dim()))) ** 2)
        self.u = nn.Parameter(u.contiguous())

    def _init_scale(self, w: torch.Tensor) -> torch.Tensor:
        qmax = max(abs(v) for v in self.levels)
        flat = w.flatten(1)
        best = torch.full((flat.shape[0],), float("inf"))
        out = flat.abs().amax(1).clamp(min=1e-8) / qmax
        for r in torch.linspace(0.02, 1.0, 100):
            s = (flat.abs().amax(1).clamp(min=1e-8) / qmax * r).unsqueeze(1)
            err = ((self._nearest(flat / s) * s - flat) ** 2).sum(1)
            out = torch.where(err < best, s.squeeze(1), out)
            best = torch.minimum(err, best)
        return out

    def _nearest(self, x: torch.Tensor) -> torch.Tensor:
        if self.levels == (-1, 1):
            return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
        q = self.q.to(x.dtype)
        return q[(x.unsqueeze(-1) - q).abs().argmin(-1)]

    def soft(self, u: torch.Tensor | None = None) -> torch.Tensor:
        """P(u) in units of the scale."""
        u = self.u if u is None else u
        b = self.beta
        if self.kind == "softmax":
            p = torch.softmax(b * u, dim=0)
            return (p * self.q.view(-1, *([1] * (u.dim() - 1)))).sum(0)
        if self.levels == (-1, 1):
            return torch.tanh(b * u)
        return 0.5 * (torch.tanh(b * (u + 0.5)) + torch.tanh(b * (u - 0.5)))

    def _invert(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.full_like(x, -20.0), torch.full_like(x, 20.0)
        for _ in range(50):  # P is increasing in u: bisection
            mid = (lo + hi) / 2
            below = self.soft(mid) < x
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    def codes(self) -> torch.Tensor:
        """The hard projection: the nearest level (sign, thresholds at +-1/2, or the argmax)."""
        with torch.no_grad():
            if self.kind == "softmax":
                return self.q[self.u.argmax(0)]
            if self.levels == (-1, 1):
                return torch.where(self.u >= 0, 1.0, -1.0).to(self.u.dtype)
            return torch.where(self.u > 0.5, 1.0, torch.where(self.u < -0.5, -1.0, 0.0)).to(self.u.dtype)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.hard:
            p = self.codes()
        else:
            with torch.no_grad():
                p = self.soft()
            if self.kind == "tanh":
                p = _DualStep.apply(self.u, p)
            else:  # the gradient w.r.t. the level probabilities, applied to the logits
                p = _SoftmaxDual.apply(self.u, p, self.q)
        return p * channel_view(self.scale, p.dim())

    def int_weight(self, w: torch.Tensor) -> torch.Tensor:
        return self.codes().to(torch.int8)


class _SoftmaxDual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, value, q):
        ctx.save_for_backward(q)
        ctx.udim = u.dim()
        return value

    @staticmethod
    def backward(ctx, g):
        (q,) = ctx.saved_tensors
        return g.unsqueeze(0) * q.view(-1, *([1] * (ctx.udim - 1))), None, None


class MDMethod(SteMethod):
    """Mirror descent on the run-width layers; straight-through (as ``ste``) on the others."""

    name = "md"
    default_lr = {"adam": 1e-3, "sgd": 1e-2}
    # The peak lr is u's (levels are O(1) apart); scales take a tenth, activation steps too: Adam moves a
    # parameter by about lr per step, and at 1e-3 a ~1e-3 step size collapses to the floor in a few steps.
    act_scale_lr_factor = 0.1

    def __init__(self, cfg: MDConfig):
        self.cfg = cfg
        self.steps = 0
        self.beta0 = 1.0  # the run's initial beta: prepare sets it from the run-width layers' level set
        self.md: dict[str, MDWeight] = {}

    def prepare(self, sim, ctx) -> list[dict]:
        groups = super().prepare(sim, ctx)  # ste on every layer, then md replaces the run-width ones
        width = sim.plan.bits.weight_bits
        lr = self.cfg.lr if self.cfg.lr is not None else self.default_lr[self.cfg.optimizer]
        for name, layer in sim.layers().items():
            spec = layer.weight_quantizer.spec
            if spec.bits != width:
                continue
            lv = self.cfg.levels_for(spec)
            self.beta0 = self.cfg.start_beta(lv)  # one level set for every run-width layer
            mdw = MDWeight(layer.weight.detach(), spec, lv, self.cfg.kind_for(lv), self.beta0)
            layer.weight_quantizer = mdw
            layer.weight.requires_grad_(False)
            mdw.scale.requires_grad_(self.cfg.learn_scale)
            self.md[name] = mdw
        ids = {id(m.u) for m in self.md.values()} | {id(m.scale) for m in self.md.values()}
        keep = [{**g, "params": [p for p in g["params"] if p.requires_grad and id(p) not in ids]} for g in groups]
        keep.append({"params": [m.u for m in self.md.values()], "lr": lr, "decay": True})
        keep.append({"params": [m.scale for m in self.md.values()], "lr": lr * 0.1})
        return keep

    def beta_at(self, progress: float) -> float:
        """beta after ``self.steps`` steps at ``progress`` of the run (capped at beta_max)."""
        c = self.cfg
        if c.anneal == "paper":
            b = self.beta0 * c.beta_growth ** (self.steps // c.beta_every)
        else:
            b = self.beta0 * (c.beta_max / self.beta0) ** min(max(progress, 0.0), 1.0)
        return min(b, c.beta_max)

    def after_step(self, progress: float) -> dict:
        super().after_step(progress)
        self.steps += 1
        b = self.beta_at(progress)
        gap, n = 0.0, 0
        with torch.no_grad():
            for m in self.md.values():
                m.beta.fill_(b)
                m.scale.clamp_(min=1e-8)
                gap += float((m.soft() - m.codes()).abs().sum())
                n += m.codes().numel()
        return {"beta": b, "gap": gap / max(n, 1)}

    @contextlib.contextmanager
    def evaluating(self, sim):
        for m in self.md.values():
            m.hard = True
        try:
            yield
        finally:
            for m in self.md.values():
                m.hard = False

    def finalize(self, sim) -> dict:
        gaps = {}
        layers = sim.layers()
        for name, m in self.md.items():
            codes, s = m.codes(), m.scale.detach().clone()
            gaps[name] = round(float((m.soft().detach() - codes).abs().mean()), 6)
            wq = WeightQuantizer(m.spec, s.numel())
            layers[name].weight_quantizer = wq
            layers[name].set_quantized_weight(codes, s)
        super().finalize(sim)
        return {"md_levels": {n: list(m.levels) for n, m in self.md.items()},
                "md_projection": {n: m.kind for n, m in self.md.items()},
                "md_start_beta": self.beta0,
                "md_final_beta": float(next(iter(self.md.values())).beta) if self.md else None,
                "md_soft_hard_gap": gaps}

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


@register_calibrator("md", config=MDConfig, needs_data=True, needs_labels=True,
                     summary="QAT by mirror descent (MD-tanh-s / MD-softmax-s): binary, ternary or any level set")
def calibrate_md(ctx, cfg: MDConfig) -> dict:
    """Mirror-descent QAT (see the module docstring).

    Args:
        ctx: calibration context (``ctx.data_dir``: labelled training folder).
        cfg: options.

    Returns:
        Trainer metrics with the levels, projections, final beta and soft-hard gaps.
    """
    cfg.check_plan(ctx.sim.plan)
    return run_qat(ctx, cfg, MDMethod(cfg))
