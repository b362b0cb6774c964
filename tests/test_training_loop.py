"""The shared training loop (qexport.training.loop): schedule, budget planning, checkpoints, bit-identical resume
(global and task RNGs), Ctrl-C, callbacks and the per-step trace, on a small real regression task."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qexport.errors import QexportError
from qexport.training import Callbacks, LoopConfig, TrainLoop
from qexport.training.loop import TRACE_ENV
from qexport.training.state import module_digest


class Regression:
    """A linear model fitted by SGD on noisy targets; every step draws from its own generator AND from the global
    torch, Python and NumPy RNGs, so a resume that forgot any of them would diverge."""

    def __init__(self, seed: int = 0, clock=None, seconds=None):
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.w_true = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
        self.infos = []
        self.clock, self.seconds = clock, seconds
        self.warmup_ended = 0

    def models(self):
        return {"net": self.net}

    def state_dict(self):
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), "warmup_ended": self.warmup_ended}

    def load_state_dict(self, st):
        self.net.load_state_dict(st["net"])
        self.opt.load_state_dict(st["opt"])
        self.warmup_ended = st["warmup_ended"]

    def rank_state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_rank_state_dict(self, st):
        self.gen.set_state(st["gen"])

    def end_warmup(self):
        self.warmup_ended += 1

    def step(self, info):
        self.infos.append(info)
        if self.clock is not None:
            self.clock.t += self.seconds(info)
        x = torch.randn(16, 4, generator=self.gen)
        noise = 0.1 * torch.randn(16, 1) + random.random() * 1e-3 + float(np.random.rand()) * 1e-3
        loss = ((self.net(x) - (x @ self.w_true + noise)) ** 2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return {"loss": loss.item(), "lr": self.opt.param_groups[0]["lr"]}


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _loop(task, tmp_path, resume=False, callbacks=None, **cfg):
    opts = {"name": "toy", "epochs": 6, "iters_per_epoch": 5, "milestones": (0.5, 0.75), "warmup_epochs": 1}
    opts.update(cfg)
    clock = task.clock if task.clock is not None else None
    kw = {"clock": clock} if clock is not None else {}
    return TrainLoop(task, LoopConfig(**opts), work_dir=tmp_path / "work", resume=resume, quiet=True,
                     callbacks=callbacks, scheduled={"lr": task.opt}, identity={"seed": 0}, **kw)


def _reseed_globals():
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)


def test_schedule_checkpoints_and_history(tmp_path):
    task = Regression()
    hist = _loop(task, tmp_path).run()
    assert [r["epoch"] for r in hist] == [1, 2, 3, 4, 5, 6]
    assert [r["warmup"] for r in hist] == [True] + [False] * 5
    # milestones 0.5 and 0.75 of 6 epochs: epochs 3 and round(4.5) = 4 (0-based) start the decays
    factors = [task.infos[i * 5].lr_factor for i in range(6)]
    assert factors == pytest.approx([1, 1, 1, 0.1, 0.01, 0.01])
    assert [r["lr"] for r in hist] == pytest.approx([0.05, 0.05, 0.05, 0.005, 0.0005, 0.0005])
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert task.warmup_ended == 1 and all(r["iters"] == 5 for r in hist)
    st = torch.load(tmp_path / "work" / "toy_checkpoint.pt", weights_only=False)
    assert (st["epoch"], st["it"]) == (6, 0) and len(st["ranks"]) == 1


def _strip(hist):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in hist]


def _interrupted_run(root: Path) -> None:
    """The run of the resume test that gets a real Ctrl-C (SIGINT) in the middle of epoch 3 (in a fresh process)."""
    _reseed_globals()
    calls = {"n": 0}

    def on_step_end(task, metrics):
        calls["n"] += 1
        if calls["n"] == 13:
            signal.raise_signal(signal.SIGINT)

    try:
        _loop(Regression(), root, callbacks=Callbacks(on_step_end=on_step_end)).run()
    except KeyboardInterrupt:
        print("interrupted")


def test_ctrl_c_then_resume_is_bit_identical(tmp_path):
    """Ctrl-C mid-epoch leaves a checkpoint; resuming (in another process state: other global RNG states, other
    initial weights) ends exactly where the uninterrupted run ends. The interrupted run is a fresh process, as a
    user's would be (a SIGINT raised late inside the long default-suite process once ended it with SIGSEGV)."""
    _reseed_globals()
    full_task = Regression()
    full = _loop(full_task, tmp_path / "a").run()
    code = (f"import sys, pathlib; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_training_loop as t; "
            f"t._interrupted_run(pathlib.Path({str(tmp_path / 'b')!r}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert res.returncode == 0 and "interrupted" in res.stdout, res.stderr[-2000:]
    st = torch.load(tmp_path / "b" / "work" / "toy_checkpoint.pt", weights_only=False)
    assert (st["epoch"], st["it"]) == (2, 3)
    _reseed_globals()  # the resumed process starts from other global RNG states: the checkpoint must restore them
    torch.rand(7), random.random(), np.random.rand()
    resumed_task = Regression(seed=5)  # other initial weights: all overwritten by the checkpoint
    resumed = _loop(resumed_task, tmp_path / "b", resume=True).run()
    assert _strip(resumed) == _strip(full)
    a, b = full_task.net.state_dict(), resumed_task.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed_task.warmup_ended == 1  # not ended twice


def test_resume_refusals(tmp_path):
    with pytest.raises(QexportError, match="no toy checkpoint"):
        _loop(Regression(), tmp_path, resume=True).run()
    _loop(Regression(), tmp_path, epochs=2).run()
    task = Regression()
    loop = TrainLoop(task, LoopConfig(name="toy", epochs=2, iters_per_epoch=5), work_dir=tmp_path / "work",
                     resume=True, quiet=True, identity={"seed": 1})
    with pytest.raises(QexportError, match="other options"):
        loop.run()
    (tmp_path / "work" / "toy_checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(QexportError, match="cannot be read"):
        _loop(Regression(), tmp_path, resume=True, epochs=2).run()


def test_config_validation():
    for bad in ({"iters_per_epoch": 0, "epochs": 1}, {"epochs": None}, {"epochs": 0}, {"epochs": 2, "milestones": (1.5,)},
                {"time_budget": -1.0}, {"epochs": 2, "warmup_epochs": -1}, {"epochs": 2, "gamma": 0.0}):
        with pytest.raises(QexportError):
            LoopConfig(**bad)


def test_callbacks_in_order(tmp_path):
    seen = []
    cb = Callbacks(on_start=lambda t: seen.append("start"), on_warmup_end=lambda t: seen.append("warm"),
                   on_step_end=lambda t, m: seen.append("step"), on_epoch_end=lambda t, r: seen.append(f"ep{r['epoch']}"),
                   on_end=lambda t: seen.append("end"))
    _loop(Regression(), tmp_path, callbacks=cb, epochs=3, iters_per_epoch=2, warmup_epochs=1).run()
    assert seen == ["start", "step", "step", "ep1", "warm", "step", "step", "ep2", "step", "step", "ep3", "end"]
    seen.clear()
    _loop(Regression(), tmp_path, callbacks=cb, epochs=1, iters_per_epoch=1, warmup_epochs=0).run()
    assert seen == ["warm", "start", "step", "ep1", "end"]  # no warm-up: the starting point comes first


def test_time_budget_stops_after_warmup(tmp_path):
    """1 s per step, 10 s budget, a warm-up epoch of 3 steps that counts. With an epoch count too large for the
    budget the run stops at 10 steps, inside epoch 4; without one the plan fits whole epochs: 3 (9 steps)."""
    clock = FakeClock()
    task = Regression(clock=clock, seconds=lambda info: 1.0)
    hist = _loop(task, tmp_path / "a", epochs=100, time_budget=10.0, iters_per_epoch=3).run()
    assert len(task.infos) == 10
    assert [r["iters"] for r in hist] == [3, 3, 3, 1]
    clock = FakeClock()
    task = Regression(clock=clock, seconds=lambda info: 1.0)
    loop = _loop(task, tmp_path / "b", epochs=None, time_budget=10.0, iters_per_epoch=3)
    hist = loop.run()
    assert len(task.infos) == 9 and loop.epochs == 3
    clock = FakeClock()  # a budget spent inside the warm-up: the warm-up still finishes and one game epoch runs
    task = Regression(clock=clock, seconds=lambda info: 1.0)
    hist = _loop(task, tmp_path / "c", epochs=None, time_budget=2.0, iters_per_epoch=3, warmup_epochs=2).run()
    assert [r["warmup"] for r in hist] == [True, True, False] and hist[-1]["iters"] == 1
    assert task.warmup_ended == 1


def test_progress_follows_iterations_or_the_budget(tmp_path):
    """StepInfo.progress: the fraction done before the step by iterations (progress_next: after it); with a time
    budget the fraction of the budget spent (the larger one when an epoch count is given too), capped at 1."""
    task = Regression()
    _loop(task, tmp_path / "a", epochs=2, iters_per_epoch=3, warmup_epochs=0).run()
    assert [i.progress for i in task.infos] == pytest.approx([k / 6 for k in range(6)])
    assert [i.progress_next for i in task.infos] == pytest.approx([(k + 1) / 6 for k in range(6)])
    clock = FakeClock()
    task = Regression(clock=clock, seconds=lambda info: 2.0)
    _loop(task, tmp_path / "b", epochs=None, time_budget=10.0, iters_per_epoch=3, warmup_epochs=0).run()
    assert [i.progress for i in task.infos] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert all(i.progress == i.progress_next for i in task.infos)
    clock = FakeClock()
    task = Regression(clock=clock, seconds=lambda info: 0.5)
    _loop(task, tmp_path / "c", epochs=2, time_budget=100.0, iters_per_epoch=2, warmup_epochs=0).run()
    assert [i.progress for i in task.infos] == pytest.approx([0.0, 0.25, 0.5, 0.75])


class Scored(Regression):
    """A task with an end-of-epoch score (as QAT's held-out top-1)."""

    def end_epoch(self, row):
        return {"score": 10.0 * row["epoch"], "none": None}


def test_task_end_epoch_columns_join_the_row(tmp_path, capsys):
    rows = []
    task = Scored()
    loop = TrainLoop(task, LoopConfig(name="toy", label="toy scored", epochs=2, iters_per_epoch=2), work_dir=tmp_path,
                     callbacks=Callbacks(on_epoch_end=lambda t, row: rows.append(dict(row))))
    hist = loop.run()
    assert [r["score"] for r in hist] == [10.0, 20.0] and rows == hist
    err = capsys.readouterr().err
    assert "score 10.0000" in err and "score 20.0000" in err and "none" not in err
    assert (tmp_path / "toy_checkpoint.pt").is_file()  # the label is the bar's, the name the file's


def test_replan_never_moves_a_passed_milestone(tmp_path):
    """Issue 11 item 9: ``--schedule paper --time-budget`` re-plans the epoch count until half the run, while the
    paper's first milestone is at a quarter. Here epochs get 20x faster after the second game epoch (a shared
    machine getting quiet), so the re-plan stretches the run: the decay at the first milestone, already applied,
    must stay (the lr never goes back up), and the later milestones land at their fractions of the new length."""
    clock = FakeClock()
    task = Regression(clock=clock, seconds=lambda info: 1.0 if info.epoch < 3 else 0.05)
    loop = _loop(task, tmp_path, epochs=None, time_budget=20.0, iters_per_epoch=2, warmup_epochs=1,
                 milestones=(0.25, 0.5, 0.75))
    loop.run()
    per_epoch = {}
    for info in task.infos:
        per_epoch.setdefault(info.epoch, info.lr_factor)
    factors = [per_epoch[e] for e in sorted(per_epoch)]
    assert all(b <= a for a, b in zip(factors, factors[1:])), factors  # never back up
    assert factors[-1] == pytest.approx(1e-3)  # all three decays happened
    assert factors.index(0.1) == 2, factors  # planned at 10 epochs: the first decay at epoch 2 ...
    assert loop.epochs > 20 and loop.milestone_epochs[0] == 2, (loop.epochs, loop.milestone_epochs)  # ... stays
    assert loop.milestone_epochs[1] > 10, loop.milestone_epochs  # later ones follow the new length


def test_plan_keeps_applied_milestones_and_no_future_one_in_the_past(tmp_path):
    loop = _loop(Regression(), tmp_path, epochs=None, time_budget=100.0, milestones=(0.25, 0.5, 0.75))
    loop.epoch, loop.elapsed = 1, 10.0
    loop.plan(10.0)  # 9 more epochs fit: 10 epochs, milestones 2, 5, 8
    assert (loop.epochs, loop.milestone_epochs) == (10, [2, 5, 8])
    loop.epoch, loop.elapsed = 3, 12.0  # epoch 2 ran decayed; then the machine got 5x faster
    loop.plan(2.0)  # 44 more: 47 epochs; 0.25 of 47 would be 12, but the decay at 2 already happened
    assert loop.epochs == 47 and loop.milestone_epochs == [2, 24, 35]
    assert loop.lr_factor(3) == pytest.approx(0.1)
    loop.epoch, loop.elapsed = 30, 90.0  # much slower again: 5 more epochs; later milestones not in the past
    loop.plan(2.0)
    assert loop.milestone_epochs == [2, 24, 30]


def test_trace_env_writes_per_step_digests(tmp_path, monkeypatch):
    monkeypatch.setenv(TRACE_ENV, str(tmp_path))
    task = Regression()
    _loop(task, tmp_path, epochs=2, iters_per_epoch=3).run()
    rows = [json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and len({r["net"] for r in rows}) == 6  # the weights change every step
    assert rows[-1]["net"] == module_digest(task.net)


def _signals_and_grace() -> None:
    import time

    from qexport.interrupt import GracefulInterrupt

    before = signal.getsignal(signal.SIGTERM)
    with GracefulInterrupt(grace=0.2) as intr:
        signal.raise_signal(signal.SIGTERM)
        assert intr.flag
        signal.raise_signal(signal.SIGINT)  # at once: the forwarded copy
        time.sleep(0.3)
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            print("stopped at once")
    assert signal.getsignal(signal.SIGTERM) is before


def test_interrupt_signals_and_grace():
    """SIGTERM counts as Ctrl-C; a repeat within the grace time (torchrun forwarding the terminal's Ctrl-C) only
    keeps the flag; a later one stops at once; the old handlers come back (in a fresh process, see above)."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_training_loop as t; t._signals_and_grace()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "stopped at once", res.stderr[-2000:]
