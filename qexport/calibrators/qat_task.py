"""The QAT trainer: a task with ``step()`` / ``state_dict()`` / ``load_state_dict()``, and the epoch runner.

:class:`QATTask` holds everything one training step needs (QuantSim, method, optimizer, data split) and is
shaped for the shared training loop; :func:`train` runs it: epochs or a time budget, a checkpoint in
``ctx.work_dir`` after every epoch (and on Ctrl-C, mid-epoch), ``--resume`` from it (bit-identical with
``--epochs`` on the CPU), one progress bar, and DistributedDataParallel when launched by ``torchrun``
(``WORLD_SIZE`` > 1: gloo on CPU, NCCL on GPU; every rank trains its DistributedSampler share, rank 0 alone
writes checkpoints).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qexport.calibrators.base import calibrate_activations
from qexport.calibrators.qat import QATConfig, QATMethod, parse_fractions
from qexport.errors import QexportError
from qexport.interrupt import GracefulInterrupt
from qexport.progress import progress_bar
from qexport.training import qat_data

CHECKPOINT = "qat_checkpoint.pt"


def dist_info() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when initialised, else from torchrun's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _init_dist(device: str) -> None:
    if dist_info()[1] > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def _broadcast(values: list[float]) -> list[float]:
    """Rank 0's values on every rank (stop flags, time fractions)."""
    if dist_info()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.broadcast(t, 0)
    return t.tolist()


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
        self.rank, self.world = dist_info()
        self.sim = ctx.sim.to(ctx.device)
        nc = getattr(ctx.model, "num_classes", None)
        with progress_bar(None, "loading training images", ctx.quiet or self.rank > 0) as bar:
            self.split = qat_data.open_labelled(ctx.data_dir, ctx.model.preprocess, nc, cfg.val_fraction, ctx.seed,
                                                cfg.max_images, progress=lambda d, t: bar.update(completed=d, total=t))
        groups = method.prepare(self.sim, ctx)
        # After prepare: the ranges are those of the network training starts from, with the method's weight
        # scales (before it, every weight grid has QuantSim's unit scale and most weights round to 0).
        self._init_scales()
        if cfg.learn_act_scales and method.name != "fp32":
            acts = [aq.scale for ap, aq in zip(self.sim.plan.activations, self.sim.act_quantizers().values())
                    if not ap.share_scale_with]
            for p in acts:
                p.requires_grad_(True)
            groups.append({"params": acts, "lr_factor": method.act_scale_lr_factor})
        self.optimizer = self._optimizer(groups)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.model = self.sim
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.sim, device_ids=None if ctx.device == "cpu" else [ctx.device])
        self.epoch, self.batch_in_epoch, self.steps, self.elapsed = 0, 0, 0, 0.0
        self.gen = torch.Generator()
        self.steps_per_epoch = math.ceil(math.ceil(len(self.split.train_idx) / self.world) / cfg.batch_size)
        self.history: list[dict] = []
        self.best: tuple[float, dict] | None = None

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

    def step(self, x: torch.Tensor, y: torch.Tensor, progress: float, progress_after: float | None = None) -> dict:
        """One optimizer step on a batch.

        Args:
            x: augmented images.
            y: labels.
            progress: fraction of the run done before this step (drives the lr schedule).
            progress_after: fraction done after it (drives the method's annealing; default ``progress``).

        Returns:
            Metrics: loss, batch accuracy, lr and the method's own.
        """
        self.sim.train()
        f = self.lr_factor(progress)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f
        x, y = x.to(self.ctx.device), y.to(self.ctx.device)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        extra = self.method.extra_loss(self.sim, logits, y)
        total = loss if extra is None else loss + extra
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        with torch.no_grad():
            for aq in self.sim.act_quantizers().values():
                aq.scale.clamp_(min=1e-8)
            self.sim.apply_shared_scales()
        out = {"loss": float(loss.detach()), "acc": float((logits.argmax(1) == y).float().mean()), "lr": self.base_lrs[0] * f}
        out.update(self.method.after_step(progress if progress_after is None else progress_after))
        self.steps += 1
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

    def state_dict(self) -> dict:
        return {"method": self.method.name, "seed": self.ctx.seed, "cfg": repr(self.cfg), "world": self.world,
                "sim": self.sim.state_dict(), "method_state": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "steps": self.steps, "elapsed": self.elapsed, "gen": self.gen.get_state(),
                "history": self.history, "best": self.best}

    def load_state_dict(self, st: dict) -> None:
        if (st.get("method"), st.get("seed"), st.get("cfg"), st.get("world")) != (
                self.method.name, self.ctx.seed, repr(self.cfg), self.world):
            raise QexportError("--resume: the checkpoint was written with another method, seed, options or process "
                               "count; rerun without --resume")
        self.sim.load_state_dict(st["sim"])
        self.method.load_state_dict(st["method_state"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.epoch, self.batch_in_epoch, self.steps = st["epoch"], st["batch_in_epoch"], st["steps"]
        self.elapsed, self.history, self.best = st["elapsed"], st["history"], st["best"]
        self.gen.set_state(st["gen"])


def _save(task: QATTask) -> None:
    if task.rank != 0 or task.ctx.work_dir is None:
        return
    path = Path(task.ctx.work_dir) / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(task.state_dict(), tmp)
    os.replace(tmp, path)


def _progress(task: QATTask, budget: float | None, epochs: int | None) -> float:
    if budget is not None:
        frac = task.elapsed / budget
        if epochs is not None:
            frac = max(frac, task.steps / (epochs * task.steps_per_epoch))
        return frac
    return task.steps / (epochs * task.steps_per_epoch)


def _run_epoch(task: QATTask, bar, flag: GracefulInterrupt, budget: float | None, epochs: int | None) -> bool:
    """Train the rest of the current epoch; returns False when the run must stop (budget spent)."""
    cfg = task.cfg
    if task.batch_in_epoch == 0:
        task.gen.manual_seed(task.ctx.seed * 7919 + task.epoch)
    order = qat_data.epoch_order(task.split, task.epoch, task.ctx.seed, task.rank, task.world)
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    interrupt_after = task.ctx.extras.get("qat_interrupt_after")  # tests: simulate Ctrl-C after N steps
    while task.batch_in_epoch < len(batches):
        t0 = time.time()
        x, y = qat_data.train_batch(task.split, batches[task.batch_in_epoch], task.gen)
        frac, stop_now = _broadcast([_progress(task, budget, epochs), float(flag.flag)])
        after = frac + (1.0 / (epochs * task.steps_per_epoch) if epochs is not None and budget is None else 0.0)
        m = task.step(x, y, min(frac, 1.0), min(after, 1.0))
        task.batch_in_epoch += 1
        task.elapsed += time.time() - t0
        on_step = task.ctx.extras.get("qat_on_step")  # tests: e.g. compare weights across ranks
        if on_step is not None:
            on_step(task)
        bar.advance(1, info=f"ep {task.epoch + 1} loss {m['loss']:.3f} acc {100 * m['acc']:.0f}% "
                    + " ".join(f"{k} {v:.3g}" for k, v in m.items() if k not in ("loss", "acc")))
        if stop_now or (interrupt_after is not None and task.steps >= interrupt_after):
            _save(task)
            raise KeyboardInterrupt
        if budget is not None and _broadcast([float(task.elapsed >= budget)])[0]:
            return False
    return True


def _end_epoch(task: QATTask, bar) -> None:
    top1 = task.evaluate()
    task.history.append({"epoch": task.epoch + 1, "steps": task.steps, "seconds": round(task.elapsed, 1),
                         "heldout_top1": top1})
    if task.cfg.select_epoch and top1 is not None and (task.best is None or top1 > task.best[0]):
        task.best = (top1, {"sim": {k: v.clone() for k, v in task.sim.state_dict().items()},
                            "method_state": task.method.state_dict(), "epoch": task.epoch + 1})
    on_epoch = task.ctx.extras.get("qat_on_epoch")  # benches: e.g. snapshot top-1 against time
    if on_epoch is not None:
        on_epoch(task, top1)
    bar.update(info=f"epoch {task.epoch + 1} held-out top-1 {top1 if top1 is None else round(top1, 2)}")
    task.epoch += 1
    task.batch_in_epoch = 0


def train(ctx, cfg: QATConfig, method: QATMethod) -> dict:
    """Run a QAT method to the end and finalize the QuantSim (see the module docstring).

    Args:
        ctx: CalibrationContext.
        cfg: trainer options.
        method: the QAT method.

    Returns:
        Metrics: per-epoch held-out top-1, steps, seconds, the method's final metrics.
    """
    _init_dist(ctx.device)
    torch.manual_seed(ctx.seed)
    task = QATTask(ctx, cfg, method)
    ckpt = Path(ctx.work_dir) / CHECKPOINT if ctx.work_dir is not None else None
    if ctx.resume:
        if ckpt is None or not ckpt.is_file():
            raise QexportError(f"--resume: no QAT checkpoint in {ctx.work_dir}")
        task.load_state_dict(torch.load(ckpt, weights_only=False))
    budget, epochs = cfg.budget_seconds, cfg.planned_epochs
    total = epochs * task.steps_per_epoch if epochs is not None else None
    quiet = ctx.quiet or task.rank > 0
    with GracefulInterrupt() as flag, progress_bar(total, f"qat {method.name}", quiet) as bar:
        bar.advance(task.steps)
        while epochs is None or task.epoch < epochs:
            if not _run_epoch(task, bar, flag, budget, epochs):
                _end_epoch(task, bar)
                break
            _end_epoch(task, bar)
            _save(task)
    if task.best is not None:
        task.sim.load_state_dict(task.best[1]["sim"])
        task.method.load_state_dict(task.best[1]["method_state"])
    final = method.finalize(task.sim)
    ctx.sim = task.sim
    return {"method": method.name, "train_images": len(task.split.train_idx),
            "heldout_images": len(task.split.val_idx), "steps": task.steps, "epochs_run": task.epoch,
            "train_seconds": round(task.elapsed, 1), "world_size": task.world, "history": task.history,
            "selected_epoch": task.best[1]["epoch"] if task.best else None, **final}
