"""The training loop every method that trains runs on (AdaSG; block reconstruction and synthesis, per phase or batch).

A method writes a *task*: an object holding its networks and optimizers, with

- ``step(info: StepInfo) -> dict[str, float]``: one iteration (forward, gradients, optimizer steps); returns the
  method's own metrics (means per epoch go to the history and the progress bar);
- ``state_dict() -> dict`` / ``load_state_dict(dict)``: everything a checkpoint must hold to continue the run
  bit-identically (networks, optimizers, method flags), as on rank 0;

and optionally

- ``models() -> dict[str, nn.Module]``: the trained networks. The loop keeps them identical on every rank
  (broadcast from rank 0 at the start and after the warm-up; floating buffers such as BatchNorm statistics
  averaged after every step) and hashes them per step when ``QEXPORT_TRACE_STEPS=DIR`` is set;
- ``rank_state_dict()`` / ``load_rank_state_dict(dict)``: per-rank state (the task's own torch.Generator, running
  values that differ between ranks); gathered from every rank into the checkpoint;
- ``end_warmup()``: called once when the warm-up epochs are over (or at once when there are none);
- ``end_epoch(row) -> dict``: called on every rank after each epoch with its history row; the returned values
  (e.g. a held-out score) join the row, the epoch line and the ``on_epoch_end`` callback.

Then::

    loop = TrainLoop(task, LoopConfig(name="mymethod", epochs=cfg.epochs, iters_per_epoch=200,
                                      time_budget=parse_duration(cfg.time_budget), warmup_epochs=2,
                                      milestones=(0.5, 0.75), gamma=0.1),
                     work_dir=ctx.work_dir, resume=ctx.resume, quiet=ctx.quiet, callbacks=ctx.callbacks,
                     scheduled={"lr": task.opt}, identity={"config": asdict(cfg), "seed": ctx.seed},
                     dist=ctx.dist)
    history = loop.run()        # one row per epoch: the metric means, the lrs, iterations, seconds

The loop does the rest:

- **length**: ``epochs`` x ``iters_per_epoch``, or a ``time_budget`` in seconds: without ``epochs`` the count is
  planned from the measured time of the first epoch after the warm-up and re-planned each epoch until
  ``replan_until`` of the run; the run stops once the budget is spent (never inside the warm-up);
- **progress**: ``StepInfo.progress`` is the fraction of the run done before the step (by iterations, or by
  the time spent with a budget), for methods whose lr or annealing follow the run continuously (QAT's cosine);
- **learning rate**: each optimizer in ``scheduled`` runs at its initial lr times ``gamma`` per milestone passed;
  milestones are fractions of the run, scaled to the planned epoch count; a re-plan never moves a milestone that
  has already been applied, nor puts a later one in the past;
- **checkpoints**: ``<work_dir>/<name>_checkpoint.pt`` after every epoch, written atomically by rank 0, with the
  task state, the loop state and every rank's RNG states (torch, CUDA, Python, NumPy) and rank state;
  ``resume=True`` continues from it and gives the same result as an uninterrupted run (same seed, same machine
  kind and process count); ``identity`` (options, seed) must match or resuming is refused;
- **Ctrl-C** (or SIGTERM): the current iteration finishes, a checkpoint is written and KeyboardInterrupt is
  raised, so the pipeline writes no recipe;
- **progress**: one bar (rank 0 only, silent with ``quiet``) showing the epoch and the step's metrics
  (``LoopConfig.show`` picks them), and a line per epoch (not for a one-epoch run: its bar shows the metrics);
- **callbacks** (:class:`Callbacks`): ``on_start``, ``on_warmup_end``, ``on_step_end``, ``on_epoch_end``,
  ``on_end``, each given the task (benchmarks measure the student there; they never change the run);
- **several processes** (``dist``, from ``qexport.training.distributed``): ranks agree on stopping (Ctrl-C,
  budget); only rank 0 writes; the task averages its gradients with ``distributed.average_`` (or wraps a module
  with ``distributed.wrap_ddp``) and draws its own share of the samples (``dist.share(n)``, seed offset by rank).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qexport.errors import QexportError
from qexport.interrupt import GracefulInterrupt
from qexport.progress import progress_bar
from qexport.training import distributed as D
from qexport.training.distributed import SINGLE, DistInfo
from qexport.training.state import capture_rng, module_digest, restore_rng

TRACE_ENV = "QEXPORT_TRACE_STEPS"


@dataclass(frozen=True)
class LoopConfig:
    """Length and schedule of a run (see the module docstring).

    Attributes:
        name: names the checkpoint file (and the progress bar without ``label``).
        label: the progress bar's text (default ``name``).
        iters_per_epoch: iterations per epoch.
        epochs: total epochs, warm-up included (None: planned from ``time_budget``).
        time_budget: wall-clock seconds of training (None: no limit).
        warmup_epochs: first epochs, flagged to the task (``StepInfo.warmup``); not timed for the plan.
        milestones: fractions of the run (0, 1] where the lr of the scheduled optimizers is multiplied by ``gamma``.
        gamma: lr factor per milestone.
        replan_until: with a budget and no ``epochs``, re-plan the epoch count each epoch until this fraction of
            the run.
        show: metrics shown on the progress bar and the epoch lines (empty: all).
    """

    name: str = "train"
    label: str = ""
    iters_per_epoch: int = 1
    epochs: int | None = None
    time_budget: float | None = None
    warmup_epochs: int = 0
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    replan_until: float = 0.5
    show: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.iters_per_epoch < 1:
            raise QexportError(f"iterations per epoch must be >= 1, got {self.iters_per_epoch}")
        if self.epochs is not None and self.epochs < 1:
            raise QexportError(f"epochs must be >= 1, got {self.epochs}")
        if self.epochs is None and self.time_budget is None:
            raise QexportError("a training run needs a number of epochs or a time budget")
        if self.time_budget is not None and self.time_budget <= 0:
            raise QexportError(f"the time budget must be positive, got {self.time_budget}")
        if self.warmup_epochs < 0:
            raise QexportError(f"warm-up epochs must be >= 0, got {self.warmup_epochs}")
        if any(not 0 < f <= 1 for f in self.milestones):
            raise QexportError(f"lr milestones are fractions of the run in (0, 1], got {self.milestones}")
        if self.gamma <= 0:
            raise QexportError(f"the lr decay factor must be positive, got {self.gamma}")


@dataclass
class Callbacks:
    """Hooks called by the loop with the task (and the step metrics or the epoch row). None: not called.

    Attributes:
        on_start: before the first iteration of this process (fresh or resumed).
        on_warmup_end: the warm-up is over (after ``task.end_warmup()``): the method's starting point.
        on_step_end: after each iteration, ``(task, metrics)``.
        on_epoch_end: after each epoch, ``(task, row)`` (row: the history entry).
        on_end: after the last iteration (not on Ctrl-C).
    """

    on_start: Callable[[Any], None] | None = None
    on_warmup_end: Callable[[Any], None] | None = None
    on_step_end: Callable[[Any, dict], None] | None = None
    on_epoch_end: Callable[[Any, dict], None] | None = None
    on_end: Callable[[Any], None] | None = None


@dataclass(frozen=True)
class StepInfo:
    """What the task's ``step`` is told: epoch and iteration (0-based), warm-up, lr factor, the job, and the
    fraction of the run done before (``progress``) and after (``progress_next``) this step: by iterations when
    the epoch count is fixed, by time spent when there is a budget (then both are the same), capped at 1."""

    epoch: int
    iteration: int
    warmup: bool
    lr_factor: float
    dist: DistInfo
    progress: float = 0.0
    progress_next: float = 0.0


class TrainLoop:
    """Runs a task (see the module docstring).

    Args:
        task: the method's task object.
        cfg: length and schedule.
        work_dir: checkpoint folder (None: no checkpoints, no resume).
        resume: continue from the checkpoint in ``work_dir``.
        quiet: no progress output.
        callbacks: named hooks.
        scheduled: history column name -> optimizer whose lr follows the milestones.
        identity: what must match for a resume (options, seed).
        dist: the job (several processes under torchrun).
        clock: seconds counter (tests pass a fake one).
    """

    def __init__(self, task, cfg: LoopConfig, *, work_dir: Path | None = None, resume: bool = False,
                 quiet: bool = False, callbacks: Callbacks | None = None, scheduled: dict | None = None,
                 identity: dict | None = None, dist: DistInfo = SINGLE, clock: Callable[[], float] = time.perf_counter):
        self.task, self.cfg, self.dist, self.clock = task, cfg, dist, clock
        self.ckpt = Path(work_dir) / f"{cfg.name}_checkpoint.pt" if work_dir is not None else None
        self.resume, self.quiet = resume, quiet
        self.callbacks = callbacks or Callbacks()
        self.scheduled = dict(scheduled or {})
        for opt in self.scheduled.values():
            for g in opt.param_groups:
                g.setdefault("initial_lr", g["lr"])
        self.identity = {**(identity or {}), "world_size": dist.world_size}
        self.fractions = tuple(sorted(cfg.milestones))
        self.epoch, self.it, self.elapsed, self.epochs = 0, 0, 0.0, cfg.epochs
        self.milestone_epochs: list[int] | None = self._milestones_for(cfg.epochs) if cfg.epochs else None
        self.history: list[dict] = []
        self.acc: dict[str, float] = {}
        self.acc_n = 0
        self.warmup_done = False
        self.trace_dir = os.environ.get(TRACE_ENV)

    # ---------------------------------------------------------------------------------------------- schedule
    def _milestones_for(self, epochs: int) -> list[int]:
        """Milestone epochs for a run of ``epochs``; applied ones are kept, later ones are not put in the past."""
        new = [max(1, round(f * epochs)) for f in self.fractions]
        old = getattr(self, "milestone_epochs", None)
        if old is None:
            return [max(m, self.epoch) for m in new]
        return [o if o < self.epoch else max(m, self.epoch) for o, m in zip(old, new)]

    def lr_factor(self, epoch: int) -> float:
        """lr multiplier at ``epoch`` (0-based): ``gamma`` per distinct milestone epoch reached."""
        if self.milestone_epochs is None:
            return 1.0
        return self.cfg.gamma ** len({m for m in self.milestone_epochs if epoch >= m})

    def plan(self, epoch_seconds: float) -> None:
        """Set the epoch count from the time one epoch takes and the budget left (time-budget runs)."""
        left = self.cfg.time_budget - self.elapsed
        self.epochs = max(self.epoch + 1, self.epoch + int(left // max(epoch_seconds, 1e-6)))
        self.milestone_epochs = self._milestones_for(self.epochs)

    def _maybe_replan(self, bar) -> None:
        cfg, w, hist = self.cfg, self.cfg.warmup_epochs, self.history
        first_game = self.epoch == w + 1
        early = self.epochs is not None and self.epoch < cfg.replan_until * self.epochs
        if cfg.time_budget is not None and cfg.epochs is None and (first_game or (self.epoch > w and early)):
            # mean game-epoch time so far: a speed measured once can be far off on a shared machine
            game = hist[w:] if w < len(hist) else hist[-1:]
            start = hist[w - 1]["seconds"] if 0 < w < len(hist) else 0.0
            self.plan((hist[-1]["seconds"] - start) / max(len(game), 1))
            bar.update(total=self.epochs * cfg.iters_per_epoch)
        elif self.epochs is None:
            bar.update(total=(self.epoch + 1) * cfg.iters_per_epoch)

    def progress(self) -> tuple[float, float]:
        """(fraction of the run done before the next iteration, after it): see StepInfo."""
        done, total = self.epoch * self.cfg.iters_per_epoch + self.it, None
        if self.cfg.epochs is not None:
            total = self.cfg.epochs * self.cfg.iters_per_epoch
        by_iters = done / total if total else 0.0
        if self.cfg.time_budget is not None:
            frac = min(max(self.elapsed / self.cfg.time_budget, by_iters), 1.0)
            return frac, frac
        return min(by_iters, 1.0), min((done + 1) / total, 1.0)

    # ------------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """The loop's own state (position, plan, history, the running epoch sums)."""
        return {"epoch": self.epoch, "it": self.it, "epochs": self.epochs, "elapsed": self.elapsed,
                "history": self.history, "acc": self.acc, "acc_n": self.acc_n,
                "milestone_epochs": self.milestone_epochs, "warmup_done": self.warmup_done}

    def load_state_dict(self, st: dict) -> None:
        for k, v in st.items():
            setattr(self, k, v)

    def save(self) -> None:
        """Write the checkpoint (every rank contributes its RNG and rank state; rank 0 writes)."""
        rank_state = self.task.rank_state_dict() if hasattr(self.task, "rank_state_dict") else None
        ranks = D.gather_objects(self.dist, {"rng": capture_rng(), "task": rank_state})
        if self.ckpt is None or not self.dist.is_main:
            return
        st = {"version": 1, "identity": self.identity, "epoch": self.epoch, "it": self.it,
              "loop": self.state_dict(), "task": self.task.state_dict(), "ranks": ranks}
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.ckpt.with_name(self.ckpt.name + ".tmp")
        torch.save(st, tmp)
        os.replace(tmp, self.ckpt)

    def _load(self) -> None:
        st = None
        if self.dist.is_main and self.ckpt is not None and self.ckpt.is_file():
            try:
                st = torch.load(self.ckpt, map_location="cpu", weights_only=False)
            except Exception as e:  # a damaged file: one line on every rank, not a hang
                st = {"error": f"{type(e).__name__}: {e}"}
        st = D.broadcast_object(self.dist, st)
        where = self.ckpt.parent if self.ckpt is not None else "(no work folder)"
        if st is None:
            raise QexportError(f"--resume: no {self.cfg.name} checkpoint in {where}")
        if "error" in st:
            raise QexportError(f"--resume: the checkpoint in {where} cannot be read ({st['error'][:120]}); "
                               "rerun without --resume")
        if st.get("identity") != self.identity:
            raise QexportError("--resume: the checkpoint was written with other options, another seed or another "
                               "process count; rerun with the same ones (or without --resume)")
        self.task.load_state_dict(st["task"])
        self.load_state_dict(st["loop"])
        mine = st["ranks"][self.dist.rank]
        restore_rng(mine["rng"])
        if hasattr(self.task, "load_rank_state_dict"):
            self.task.load_rank_state_dict(mine["task"])

    # ------------------------------------------------------------------------------------------------- run
    def _models(self) -> list[torch.nn.Module]:
        return list(self.task.models().values()) if hasattr(self.task, "models") else []

    def _end_warmup(self) -> None:
        if hasattr(self.task, "end_warmup"):
            self.task.end_warmup()
        D.broadcast_modules_(self.dist, self._models())
        self.warmup_done = True
        if self.callbacks.on_warmup_end is not None:
            self.callbacks.on_warmup_end(self.task)

    def run(self) -> list[dict]:
        """Train to the end (or the budget); returns the history (one row per epoch).

        Raises:
            KeyboardInterrupt: on Ctrl-C / SIGTERM, after writing a checkpoint.
            QexportError: ``resume`` without a usable checkpoint.
        """
        if self.resume:
            self._load()
        else:
            D.broadcast_modules_(self.dist, self._models())
        if self.cfg.warmup_epochs == 0 and not self.warmup_done:
            self._end_warmup()
        if self.callbacks.on_start is not None:
            self.callbacks.on_start(self.task)
        ipe = self.cfg.iters_per_epoch
        silent = self.quiet or not self.dist.is_main
        with GracefulInterrupt() as intr, progress_bar((self.epochs or 1) * ipe, self.cfg.label or self.cfg.name,
                                                      silent) as bar:
            bar.advance(self.epoch * ipe + self.it)
            while self.epochs is None or self.epoch < self.epochs:
                if self._run_epoch(intr, bar, silent):
                    break
            if not self.warmup_done:
                self._end_warmup()
        if self.callbacks.on_end is not None:
            self.callbacks.on_end(self.task)
        return self.history

    def _run_epoch(self, intr: GracefulInterrupt, bar, silent: bool) -> bool:
        """One epoch (or what is left of it); returns True when the budget is spent."""
        cfg = self.cfg
        warm = self.epoch < cfg.warmup_epochs
        factor = self.lr_factor(self.epoch)
        for opt in self.scheduled.values():
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * factor
        t0 = self.clock()
        while self.it < cfg.iters_per_epoch:
            metrics = self.task.step(StepInfo(self.epoch, self.it, warm, factor, self.dist, *self.progress()))
            self.it += 1
            for k, v in metrics.items():
                self.acc[k] = self.acc.get(k, 0.0) + v
            self.acc_n += 1
            self.elapsed += self.clock() - t0
            t0 = self.clock()
            if self.dist.active:
                D.average_buffers_(self.dist, self._models())
            self._trace()
            if self.callbacks.on_step_end is not None:
                self.callbacks.on_step_end(self.task, metrics)
            bar.advance(1, info=self._info(metrics, warm))
            stop = intr.flag
            if self.dist.active:  # every rank stops together, and on the same budget clock
                flag, self.elapsed = D.max_(self.dist, [float(stop), self.elapsed])
                stop = flag > 0
            if stop:
                self.save()
                raise KeyboardInterrupt
            if cfg.time_budget is not None and self.elapsed >= cfg.time_budget and not warm:
                break
        self._end_epoch(warm, silent)
        self._maybe_replan(bar)
        out_of_time = cfg.time_budget is not None and self.elapsed >= cfg.time_budget and self.epoch > cfg.warmup_epochs
        self.save()
        return out_of_time

    def _end_epoch(self, warm: bool, silent: bool) -> None:
        n = max(self.acc_n, 1)
        keys = list(self.acc)
        sums = [self.acc[k] for k in keys]
        if self.dist.active:  # the epoch means over every rank's samples
            sums = D.mean_values(self.dist, sums)
        row = {"epoch": self.epoch + 1, "warmup": warm,
               **{name: opt.param_groups[0]["lr"] for name, opt in self.scheduled.items()},
               **{k: round(v / n, 5) for k, v in zip(keys, sums)}, "iters": int(n), "seconds": round(self.elapsed, 1)}
        extra = (self.task.end_epoch(row) or {}) if hasattr(self.task, "end_epoch") else {}
        row.update(extra)
        self.history.append(row)
        if self.callbacks.on_epoch_end is not None:
            self.callbacks.on_epoch_end(self.task, row)
        if not silent and self.cfg.epochs != 1:  # a one-epoch run (a phase): its bar already shows the metrics
            shown = [k for k in [*keys, *extra] if (not self.cfg.show or k in self.cfg.show) and row[k] is not None]
            sys.stderr.write(f"epoch {row['epoch']}{' (warm-up)' if warm else ''}: "
                             + " ".join(f"{k} {row[k]:.4f}" for k in shown)
                             + "".join(f" {name} {row[name]:.1e}" for name in self.scheduled)
                             + f" t {row['seconds']:.0f}s\n")
        self.acc, self.acc_n = {}, 0
        self.epoch += 1
        self.it = 0
        if not self.warmup_done and self.epoch == self.cfg.warmup_epochs:
            self._end_warmup()

    def _info(self, metrics: dict, warm: bool) -> str:
        tot = f"/{self.epochs}" if self.epochs is not None else ""
        shown = [k for k in metrics if not self.cfg.show or k in self.cfg.show]
        where = "" if self.cfg.epochs == 1 else f"ep {self.epoch + 1}{tot}{' warm-up' if warm else ''} "
        return where + " ".join(f"{k} {metrics[k]:.4g}" for k in shown)

    def _trace(self) -> None:
        """``QEXPORT_TRACE_STEPS=DIR``: append this rank's per-step digests of the trained models to DIR."""
        if not self.trace_dir:
            return
        rec = {"epoch": self.epoch, "it": self.it, **{k: module_digest(m) for k, m in self.task.models().items()}}
        path = Path(self.trace_dir) / f"rank{self.dist.rank}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
