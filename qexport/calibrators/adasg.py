"""AdaSG (``--method adasg``): data-free quantization as a zero-sum game between a generator and the quantized
network (paper ../shared/papers/000_*, working summary ../shared/docs/methods.md section 1).

Players: the frozen float teacher P (the loaded model, with its BatchNorm layers, whose running statistics
drive the BN-statistics loss), the student Q (the QuantSim, trained in place) and a conditional ACGAN-style
generator G. Each iteration, with z ~ N(0, I) and uniform labels y, x = G(z|y):

- maximisation (G trains, Q fixed): ``L_G = a (L_ds + L_as) + b L_b + c L_BNS``;
- minimisation (Q trains on x detached, G fixed): ``L_Q = tau^2 * mean(log C - H(softmax((z_p - z_q) / tau)))``,
  the reference code's form of the paper's ``1 - H'(p_ds^tau)`` (see :func:`student_loss`);
- the balance gap ``BG = R(after) - R(before)``, ``R = E[1 - H'(p_ds)]`` (same z and y re-evaluated after both
  updates) and the disagreement ``E[H(p_ds)]`` are computed every iteration and shown per epoch.

``loss="gdfq"`` is the baseline the paper improves on (G: cross-entropy on P + 0.1 BN statistics; Q: KL
distillation at temperature tau), for comparisons at equal budget and seed.

No real image is read: the student is initialised on synthetic samples only (per-channel MSE weight scales,
then, after the warm-up epochs where only G trains, activation ranges by an MSE clipping search over samples of
the warmed-up generator; the paper's EMA of min/max is ``act_init="ema"``). The quantizers are the plan's deployable ones (symmetric per-channel weights with zero point 0,
per-tensor activations), not the paper's asymmetric min-max ones; weight scales stay at their initial values and
the weights train through the straight-through estimator, so ``sim.snap_weights()`` at the end makes them exact
integers times the scales. The final student is the last one: nothing is selected on evaluation data.

Runs are resumable: a checkpoint in ``ctx.work_dir`` after every epoch; Ctrl-C finishes the current iteration,
writes a checkpoint and re-raises KeyboardInterrupt (the pipeline then leaves no partial recipe); ``--resume``
continues it, and with the same seed gives the same result as an uninterrupted run (CPU).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from qexport.calibrators import register_calibrator
from qexport.calibrators.adasg_config import AdaSGConfig, parse_duration
from qexport.calibrators.adasg_game import (
    BNStatsHook,
    EMARange,
    Generator,
    bound_loss,
    entropy,
    generate_batches,
    generate_no_stats,
    kd_loss,
    loss_as,
    loss_ds,
    normalized_entropy,
    save_grid,
    student_loss,
)
from qexport.calibrators.base import (
    CalibrationContext,
    act_scale_minmax,
    calibrate_activations,
    set_weight_scales,
)
from qexport.errors import QexportError
from qexport.models import class_names
from qexport.training import distributed as D
from qexport.training.loop import LoopConfig, StepInfo, TrainLoop

__all__ = ["AdaSGConfig", "AdaSGTask", "CHECKPOINT", "Generator", "bound_loss", "calibrate_adasg", "entropy",
           "kd_loss", "loss_as", "loss_ds", "normalized_entropy", "parse_duration", "student_loss"]

CHECKPOINT = "adasg_checkpoint.pt"  # the training loop's file for a run named "adasg", in ctx.work_dir
# generator seed of rank r: seed + 1 + r * stride (rank 0 keeps the single-process stream)
_RANK_SEED_STRIDE = 1_000_003


class AdaSGTask:
    """The game as a task of the shared training loop (``qexport.training.loop``): one instance per run.

    With several processes (torchrun) each rank draws its share of the batch (``--batch-size`` is the global batch)
    from its own generator (seed offset by rank), and the G and Q gradients are averaged over the ranks before
    each optimizer step, so every rank holds the same players.
    """

    def __init__(self, ctx: CalibrationContext, cfg: AdaSGConfig):
        self.ctx, self.cfg, self.dist = ctx, cfg, ctx.dist
        self.device = torch.device(ctx.device)
        loaded = ctx.model
        self.num_classes = int(loaded.num_classes or 0)
        if self.num_classes < 2:
            raise QexportError("--method adasg needs a classifier with a known number of classes (>= 2)")
        c, h, w = loaded.input_shape
        self.teacher = loaded.model.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        if not any(isinstance(m, nn.BatchNorm2d) for m in self.teacher.modules()) and cfg.gamma > 0:
            raise QexportError("--method adasg needs a teacher with BatchNorm layers (BN-statistics loss); "
                               "this model has none")
        lo, hi = self.dist.share(cfg.batch_size)
        self.local_batch = hi - lo
        if self.local_batch < 2:
            raise QexportError(f"--batch-size {cfg.batch_size} over {self.dist.world_size} processes leaves fewer "
                               "than 2 samples per process (batch statistics); raise --batch-size or use fewer")
        self.sim = ctx.sim.to(self.device).eval()
        torch.manual_seed(ctx.seed)
        self.G = Generator(self.num_classes, c, (h, w), cfg.latent_dim).to(self.device)
        self.gen = torch.Generator(device="cpu").manual_seed(ctx.seed + 1 + _RANK_SEED_STRIDE * self.dist.rank)
        self.q_params = [p for layer in self.sim.layers().values() for p in (layer.weight, layer.bias) if p is not None]
        for p in self.sim.parameters():
            p.requires_grad_(False)
        for p in self.q_params:
            p.requires_grad_(True)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=(0.5, 0.999))
        self.opt_q = torch.optim.SGD(self.q_params, lr=cfg.resolved()[2], momentum=cfg.momentum, nesterov=True,
                                     weight_decay=cfg.weight_decay)
        self.bns = BNStatsHook(self.teacher)
        self.ema = {name: EMARange(cfg.act_momentum) for name in self.sim.act_quantizers()}
        self.acts_frozen = False
        self.r_prev: float | None = None
        self.loop: TrainLoop | None = None

    # ------------------------------------------------------------------------------------- loop interface
    def models(self) -> dict[str, nn.Module]:
        return {"generator": self.G, "student": self.sim}

    def state_dict(self) -> dict:
        return {"G": self.G.state_dict(), "sim": self.sim.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_q": self.opt_q.state_dict(), "acts_frozen": self.acts_frozen,
                "ema": {k: (v.min, v.max) for k, v in self.ema.items()}}

    def load_state_dict(self, st: dict) -> None:
        self.G.load_state_dict(st["G"])
        self.sim.load_state_dict(st["sim"])
        self.opt_g.load_state_dict(st["opt_g"])
        self.opt_q.load_state_dict(st["opt_q"])
        self.acts_frozen = st["acts_frozen"]
        for k, (lo, hi) in st["ema"].items():
            self.ema[k].min, self.ema[k].max = lo, hi

    def rank_state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "r_prev": self.r_prev}

    def load_rank_state_dict(self, st: dict) -> None:
        self.gen.set_state(st["gen"])
        self.r_prev = st["r_prev"]

    def end_warmup(self) -> None:
        self.freeze_activation_ranges()

    def step(self, info: StepInfo) -> dict[str, float]:
        return self.iteration(info.warmup)

    # ------------------------------------------------------------------------------------------------- pieces
    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, self.cfg.latent_dim, generator=self.gen).to(self.device)
        y = torch.randint(0, self.num_classes, (n,), generator=self.gen).to(self.device)
        return z, y

    def disagreement_r(self, z_p: torch.Tensor, z_q: torch.Tensor) -> tuple[float, float]:
        """(R = mean(1 - H'(p_ds)), mean H(p_ds)) of a batch."""
        h = entropy(z_p - z_q)
        return float((1 - normalized_entropy(h, self.num_classes)).mean()), float(h.mean())

    def freeze_activation_ranges(self) -> None:
        """End of warm-up: set activation scales (EMA min/max, or a search on synthetic samples) and freeze them.

        With several processes each rank computes its own; the loop then copies rank 0's to every rank."""
        aqs = self.sim.act_quantizers()
        if self.cfg.act_init == "ema":
            for name, aq in aqs.items():
                sp = aq.spec
                with torch.no_grad():
                    aq.scale.fill_(act_scale_minmax(self.ema[name], sp.signed, sp.qmin, sp.qmax))
            self.sim.apply_shared_scales()
        else:
            xs = []
            with torch.no_grad():
                self.G.train()
                n = self.cfg.act_init_samples
                while sum(x.shape[0] for x in xs) < n:
                    z, y = self.sample(min(64, n))
                    xs.append(self.G(z, y).cpu())
            calibrate_activations(self.sim, torch.cat(xs)[:n], self.cfg.act_init, quiet=True, seed=self.ctx.seed,
                                  device=str(self.device), batch_size=64)
        self.acts_frozen = True

    def _student(self, x: torch.Tensor, warm: bool, observe: bool = True) -> torch.Tensor:
        """Q(x); during warm-up with float activations, and (``act_init="ema"`` only) their min/max observed."""
        if not warm:
            return self.sim(x)
        observers = self.ema if observe and self.cfg.act_init == "ema" else {}
        with self.sim.quant_disabled(weights=False, acts=True):
            for name, aq in self.sim.act_quantizers().items():
                aq.observer = observers.get(name)
            try:
                return self.sim(x)
            finally:
                for aq in self.sim.act_quantizers().values():
                    aq.observer = None

    def _generator_loss(self, z_p, z_q, y, hn, l_bns) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        if cfg.loss == "adasg":
            l_ds, l_as = loss_ds(z_p, z_q, y), loss_as(z_p, z_q, y)
            l_b = bound_loss(hn, cfg.lambda_l, cfg.lambda_u)
            l_g = cfg.alpha * (l_ds + l_as) + cfg.beta * l_b + cfg.gamma * l_bns
            return l_g, {"ds": l_ds.item(), "as": l_as.item(), "b": l_b.item()}
        l_ce = F.cross_entropy(z_p, y)
        return l_ce + 0.1 * l_bns, {"ce": l_ce.item()}

    def iteration(self, warm: bool) -> dict[str, float]:
        """One game step: G update (maximisation), then Q update (minimisation) on the same, detached samples.

        One forward of each network serves both updates: the G gradients and the Q gradients are taken separately
        (``torch.autograd.grad``), so Q's step uses x as G made it before its update, exactly as with x detached.
        With several processes both sets of gradients are averaged over the ranks (what DDP does after
        ``backward()``, which this two-player step does not call).
        """
        cfg, C = self.cfg, self.num_classes
        z, y = self.sample(self.local_batch)
        self.G.train()
        x = self.G(z, y)
        self.bns.clear()
        z_p = self.teacher(x)
        l_bns = self.bns.loss()
        z_q = self._student(x, warm)
        h = entropy(z_p - z_q)
        hn = normalized_entropy(h, C)
        r_now = float((1 - hn.detach()).mean())
        l_g, parts = self._generator_loss(z_p, z_q, y, hn, l_bns)
        g_params = [p for p in self.G.parameters()]
        l_q_val = 0.0
        if warm:
            grads_g = torch.autograd.grad(l_g, g_params)
        else:
            grads_g = torch.autograd.grad(l_g, g_params, retain_graph=True)
            zpd = z_p.detach()
            l_q = student_loss(zpd, z_q, cfg.tau) if cfg.loss == "adasg" else kd_loss(zpd, z_q, cfg.tau)
            grads_q = torch.autograd.grad(l_q, self.q_params)
            D.average_(self.dist, grads_q)
            for p, g in zip(self.q_params, grads_q):
                p.grad = g
            self.opt_q.step()
            l_q_val = l_q.item()
        D.average_(self.dist, grads_g)
        for p, g in zip(g_params, grads_g):
            p.grad = g
        self.opt_g.step()
        bg = self._balance_gap(z, y, warm, r_now)
        self.r_prev = r_now
        agree = float((z_p.argmax(1) == z_q.argmax(1)).float().mean())
        return {"L_G": l_g.item(), "L_Q": l_q_val, "BNS": l_bns.item(), "BG": bg,
                "H": h.mean().item(), "R": r_now, "agree": agree, **parts}

    def _balance_gap(self, z: torch.Tensor, y: torch.Tensor, warm: bool, r_now: float) -> float:
        """BG = R(after the iteration) - R(before). By default R after iteration t is measured on iteration t+1's
        batch (no extra forward); ``bg_exact`` re-evaluates the same z, y with the updated players."""
        if not self.cfg.bg_exact:
            return r_now - self.r_prev if self.r_prev is not None else 0.0
        with torch.no_grad():
            self.bns.active = False
            try:
                x2 = generate_no_stats(self.G, z, y)
                r_after, _ = self.disagreement_r(self.teacher(x2), self._student(x2, warm, observe=False))
            finally:
                self.bns.active = True
        return r_after - r_now

    # -------------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        """Train on the shared loop (resume, budget, checkpoints, Ctrl-C), then snap and write the artifacts."""
        cfg, ctx = self.cfg, self.ctx
        epochs, ipe, _ = cfg.resolved()
        if not ctx.resume:
            set_weight_scales(self.sim, cfg.weight_init)
        loop_cfg = LoopConfig(name="adasg", iters_per_epoch=ipe, epochs=epochs, time_budget=cfg.budget_seconds,
                              warmup_epochs=cfg.warmup, milestones=cfg.milestone_fractions, gamma=cfg.gamma_lr,
                              show=("L_G", "L_Q", "BG", "H"))
        self.loop = TrainLoop(self, loop_cfg, work_dir=ctx.work_dir, resume=ctx.resume, quiet=ctx.quiet,
                              callbacks=ctx.callbacks, scheduled={"lr_q": self.opt_q},
                              identity={"config": asdict(cfg), "seed": ctx.seed}, dist=self.dist)
        self.loop.run()
        return self.finish()

    def finish(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        self.bns.remove()
        for p in self.sim.parameters():
            p.requires_grad_(False)
        self.sim.snap_weights()
        ctx.sim = self.sim
        loop = self.loop
        _, ipe, lr_q = cfg.resolved()
        metrics = {"loss": cfg.loss, "epochs_run": loop.epoch, "iters_per_epoch": ipe,
                   "iterations": sum(r.get("iters", ipe) for r in loop.history), "train_seconds": round(loop.elapsed, 1),
                   "lr_q": lr_q, "weights": cfg.weight_init, "activations": f"{cfg.act_init} (synthetic)"}
        if self.dist.world_size > 1:
            metrics["processes"] = self.dist.world_size
        if loop.history:
            last = loop.history[-1]
            metrics.update({f"final_{k}": last[k] for k in ("L_G", "L_Q", "BG", "H", "agree") if k in last})
        if ctx.artifact_dir is not None and self.dist.is_main:
            self.write_artifacts(Path(ctx.artifact_dir))
        return metrics

    def write_artifacts(self, out: Path) -> None:
        from safetensors.torch import save_file

        cfg = self.cfg
        G = self.G.cpu()
        save_file({k: v.detach().contiguous() for k, v in G.state_dict().items()}, str(out / "generator.safetensors"),
                  metadata={"num_classes": str(self.num_classes), "latent_dim": str(cfg.latent_dim),
                            "size": json.dumps(list(G.size)), "channels": str(G.out.out_channels)})
        (out / "adasg_history.json").write_text(json.dumps({"config": _jsonable(asdict(cfg)), "history": self.loop.history},
                                                           indent=1))
        classes = class_names(self.ctx.model.spec, self.num_classes)
        gen = torch.Generator().manual_seed(self.ctx.seed + 7)
        k = max(1, cfg.grid_per_class)
        with torch.no_grad():
            y = torch.arange(self.num_classes).repeat_interleave(k)
            x = generate_batches(G, y, cfg.latent_dim, gen)
        save_grid(x, self.ctx.model.preprocess, self.num_classes, k, out / "samples_grid.png")
        if cfg.save_synthetic:
            from qexport.data.synthetic import save_image_folder

            with torch.no_grad():
                y = torch.randint(0, self.num_classes, (cfg.save_synthetic,), generator=gen)
                x = generate_batches(G, y, cfg.latent_dim, gen)
            save_image_folder(x, y, classes, self.ctx.model.preprocess, out / "synthetic")
        G.to(self.device)


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


@register_calibrator("adasg", config=AdaSGConfig, needs_data=False,
                     summary="generator vs quantized net zero-sum game (AdaSG), resumable; --loss gdfq baseline")
def calibrate_adasg(ctx: CalibrationContext, cfg: AdaSGConfig) -> dict:
    """AdaSG calibration (data-free; see the module docstring).

    Args:
        ctx: calibration context (ctx.data is None: no real image is read).
        cfg: options.

    Returns:
        Metrics for the recipe.
    """
    if ctx.data is not None:
        raise QexportError("--method adasg is data-free and takes no calibration images")
    return AdaSGTask(ctx, cfg).run()
