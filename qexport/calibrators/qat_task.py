"""The QAT trainer: :class:`QATTask`, a task of the shared training loop (:mod:`qexport.training.loop`), and
:func:`train`, which runs it.

The loop gives every QAT method epochs or a time budget, a checkpoint in ``ctx.work_dir`` after every epoch (and
on Ctrl-C, mid-epoch), ``--resume`` from it (bit-identical with ``--epochs`` on the same machine kind), one
progress bar, named callbacks, and several processes under ``torchrun`` (DistributedDataParallel: gloo on CPU,
NCCL on GPU; every rank trains its DistributedSampler share, rank 0 alone writes). The task adds what is QAT's
own: the learning rate follows the run continuously (cosine, or steps at fractions of the run), the held-out
share of the training folder is scored after every epoch, and ``--select-epoch`` keeps the best epoch.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from qexport.calibrators.base import calibrate_activations
from qexport.calibrators.qat import QATConfig, QATMethod, parse_fractions
from qexport.errors import QexportError
from qexport.progress import progress_bar
from qexport.training import distributed as D
from qexport.training import qat_data
from qexport.training.loop import LoopConfig, StepInfo, TrainLoop

LOOP_NAME = "qat"
# A learned activation step size may shrink, but not below this fraction of its initial (percentile) value: at
# a high lr Adam drove the pooled activation's step to the absolute floor (1e-8) within an epoch, every code
# became 0 and the network never recovered (md w1a8 at lr 3e-3, docs/qat.md).
ACT_SCALE_FLOOR = 1e-2
CHECKPOINT = f"{LOOP_NAME}_checkpoint.pt"  # the training loop's file for a run named "qat", in ctx.work_dir


class QATTask:
    """One QAT run's state and step.

    Args:
        ctx: CalibrationContext (``ctx.sim`` is trained in place; ``ctx.data_dir`` is the labelled folder).
        cfg: trainer options.
        method: the QAT method.
    """

    def __init__(self, ctx, cfg: QATConfig, method: QATMethod):
        self.ctx, self.cfg, self.method = ctx, cfg, method
        if ctx.data_dir is None:
            raise QexportError(f"--method {method.name} trains on labelled images: pass --data DIR")
        self.rank, self.world = ctx.dist.rank, ctx.dist.world_size
        self.sim = ctx.sim.to(ctx.device)
        nc = getattr(ctx.model, "num_classes", None)
        with progress_bar(None, "loading training images", ctx.quiet or self.rank > 0) as bar:
            self.split = qat_data.open_labelled(ctx.data_dir, ctx.model.preprocess, nc, cfg.val_fraction, ctx.seed,
                                                cfg.max_images, progress=lambda d, t: bar.update(completed=d, total=t))
        groups = method.prepare(self.sim, ctx)
        # After prepare: the ranges are those of the network training starts from, with the method's weight
        # scales (before it, every weight grid has QuantSim's unit scale and most weights round to 0).
        self._init_scales()
        self.act_floors = [aq.scale.detach().clone().mul_(ACT_SCALE_FLOOR).clamp_(min=1e-8)
                           for aq in self.sim.act_quantizers().values()]
        if cfg.learn_act_scales and method.name != "fp32":
            acts = [aq.scale for ap, aq in zip(self.sim.plan.activations, self.sim.act_quantizers().values())
                    if not ap.share_scale_with]
            for p in acts:
                p.requires_grad_(True)
            groups.append({"params": acts, "lr_factor": method.act_scale_lr_factor})
        self.optimizer = self._optimizer(groups)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.model = D.wrap_ddp(ctx.dist, self.sim)
        self.teacher = _frozen_teacher(ctx.folded, ctx.device) if cfg.distill > 0 else None
        self.gen = torch.Generator()
        self.steps_per_epoch = math.ceil(math.ceil(len(self.split.train_idx) / self.world) / cfg.batch_size)
        self.best: tuple[float, dict] | None = None
        self._batches: tuple[int, list[list[int]]] | None = None  # (epoch, this rank's batches of it)

    def _init_scales(self) -> None:
        """Activation scales by the 99.999th percentile on a seeded subset of the training split."""
        n = min(self.cfg.act_init_images, len(self.split.train_idx))
        g = torch.Generator().manual_seed(self.ctx.seed + 17)
        idx = [self.split.train_idx[i] for i in torch.randperm(len(self.split.train_idx), generator=g)[:n].tolist()]
        if self.split.in_memory is not None:
            x = self.split.in_memory[0][idx]
        else:
            x = torch.stack([self.split.folder.load(i) for i in idx])
        calibrate_activations(self.sim, x, "percentile", quiet=True, seed=self.ctx.seed, device=self.ctx.device)

    def _optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        cfg = self.cfg
        lr = cfg.lr if cfg.lr is not None else self.method.default_lr[cfg.optimizer]
        clean = []
        for g in groups:
            g = dict(g)
            g["params"] = [p for p in g["params"] if p.requires_grad]
            if not g["params"]:
                continue
            g.setdefault("lr", lr * g.pop("lr_factor", 1.0))
            g["weight_decay"] = cfg.weight_decay if g.pop("decay", False) else 0.0
            clean.append(g)
        if not clean:
            raise QexportError(f"--method {self.method.name}: nothing to train in this plan")
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(clean, lr=lr, momentum=cfg.momentum)
        return torch.optim.Adam(clean, lr=lr)

    def lr_factor(self, progress: float) -> float:
        """The schedule's lr multiplier at ``progress`` (fraction of the run, 0..1)."""
        if self.cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
        drops = sum(progress >= m for m in parse_fractions(self.cfg.step_milestones, "--step-milestones"))
        return self.cfg.step_gamma**drops

    def step(self, info: StepInfo) -> dict:
        """The loop's iteration: batch ``info.iteration`` of this rank's share of epoch ``info.epoch``, augmented
        with the epoch's seeded generator, then :meth:`update` at the loop's progress.

        Args:
            info: where the loop is.

        Returns:
            The step's metrics.
        """
        if self._batches is None or self._batches[0] != info.epoch:
            order = qat_data.epoch_order(self.split, info.epoch, self.ctx.seed, self.rank, self.world)
            bs = self.cfg.batch_size
            self._batches = (info.epoch, [order[i : i + bs] for i in range(0, len(order), bs)])
        if info.iteration == 0:
            self.gen.manual_seed(self.ctx.seed * 7919 + info.epoch)
        x, y = qat_data.train_batch(self.split, self._batches[1][info.iteration], self.gen)
        return self.update(x, y, info.progress, info.progress_next)

    def update(self, x: torch.Tensor, y: torch.Tensor, progress: float, progress_after: float | None = None) -> dict:
        """One optimizer step on a given batch.

        Args:
            x: augmented images.
            y: labels.
            progress: fraction of the run done before this step (drives the lr schedule).
            progress_after: fraction done after it (drives the method's annealing; default ``progress``).

        Returns:
            Metrics: loss (the cross-entropy), batch accuracy, lr, the distillation term ``kd`` when on, and the
            method's own.
        """
        self.sim.train()
        f = self.lr_factor(progress)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f
        x, y = x.to(self.ctx.device), y.to(self.ctx.device)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        total, out = loss, {}
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher(x)
            kd = distillation_loss(logits, target, self.cfg.distill_temperature)
            total = (1.0 - self.cfg.distill) * loss + self.cfg.distill * kd
            out["kd"] = float(kd.detach())
        extra = self.method.extra_loss(self.sim, logits, y)
        total = total if extra is None else total + extra
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        with torch.no_grad():
            for aq, floor in zip(self.sim.act_quantizers().values(), self.act_floors):
                aq.scale.copy_(torch.maximum(aq.scale, floor))
            self.sim.apply_shared_scales()
        out.update({"loss": float(loss.detach()), "acc": float((logits.argmax(1) == y).float().mean()),
                    "lr": self.base_lrs[0] * f})
        out.update(self.method.after_step(progress if progress_after is None else progress_after))
        return out

    def evaluate(self) -> float | None:
        """Top-1 (%) on the held-out share of the training folder (None when it is empty)."""
        if not self.split.val_idx:
            return None
        self.sim.eval()
        right = 0
        with torch.no_grad(), self.method.evaluating(self.sim):
            for x, y in qat_data.val_batches(self.split, 256):
                right += int((self.sim(x.to(self.ctx.device)).argmax(1).cpu() == y).sum())
        return 100.0 * right / len(self.split.val_idx)

    def end_epoch(self, row: dict) -> dict:
        """The loop's end-of-epoch hook: the held-out top-1 joins the row; ``--select-epoch`` keeps the best."""
        top1 = self.evaluate()
        if self.cfg.select_epoch and top1 is not None and (self.best is None or top1 > self.best[0]):
            self.best = (top1, {"sim": {k: v.clone() for k, v in self.sim.state_dict().items()},
                                "method_state": self.method.state_dict(), "epoch": row["epoch"]})
        return {"heldout_top1": None if top1 is None else round(top1, 2)}

    def models(self) -> dict[str, torch.nn.Module]:
        return {"sim": self.sim}

    def state_dict(self) -> dict:
        return {"sim": self.sim.state_dict(), "method_state": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "best": self.best}

    def load_state_dict(self, st: dict) -> None:
        self.sim.load_state_dict(st["sim"])
        self.method.load_state_dict(st["method_state"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.best = st["best"]

    def rank_state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_rank_state_dict(self, st: dict) -> None:
        self.gen.set_state(st["gen"])


def _frozen_teacher(folded: torch.nn.Module, device) -> torch.nn.Module:
    """A frozen copy of the BN-folded float model, in eval mode, for the distillation targets."""
    teacher = copy.deepcopy(folded).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distillation_loss(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation term: ``T^2 * KL(softmax(target / T) || softmax(logits / T))``, batch mean.

    The ``T^2`` keeps the gradient's size independent of the temperature.

    Args:
        logits: the trained (quantized) network's logits.
        target_logits: the float teacher's logits for the same batch (no gradient).
        temperature: T > 0.

    Returns:
        Scalar loss.
    """
    t = temperature
    log_p = F.log_softmax(logits / t, dim=1)
    log_q = F.log_softmax(target_logits / t, dim=1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * (t * t)


def train(ctx, cfg: QATConfig, method: QATMethod) -> dict:
    """Run a QAT method on the shared training loop to the end and finalize the QuantSim.

    Args:
        ctx: CalibrationContext (``ctx.callbacks`` reach the loop; ``ctx.dist`` under torchrun).
        cfg: trainer options.
        method: the QAT method.

    Returns:
        Metrics: the loop's per-epoch history (with held-out top-1), steps, seconds, the method's final metrics.
    """
    torch.manual_seed(ctx.seed)
    task = QATTask(ctx, cfg, method)
    loop = TrainLoop(task, LoopConfig(name=LOOP_NAME, label=f"qat {method.name}", iters_per_epoch=task.steps_per_epoch,
                                      epochs=cfg.planned_epochs, time_budget=cfg.budget_seconds),
                     work_dir=ctx.work_dir, resume=ctx.resume, quiet=ctx.quiet, callbacks=ctx.callbacks,
                     identity={"method": method.name, "config": repr(cfg), "seed": ctx.seed}, dist=ctx.dist)
    history = loop.run()
    if task.best is not None:
        task.sim.load_state_dict(task.best[1]["sim"])
        task.method.load_state_dict(task.best[1]["method_state"])
    final = method.finalize(task.sim)
    ctx.sim = task.sim
    return {"method": method.name, "train_images": len(task.split.train_idx),
            "heldout_images": len(task.split.val_idx), "steps": sum(r["iters"] for r in history),
            "epochs_run": len(history), "train_seconds": round(loop.elapsed, 1), "world_size": task.world,
            "history": history, "selected_epoch": task.best[1]["epoch"] if task.best else None, **final}
