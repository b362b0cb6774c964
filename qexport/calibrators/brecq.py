"""``--method brecq``: block reconstruction with learned rounding (BRECQ, as used by MixMix; methods.md section 2).

Blocks come from the graph (qexport/calibrators/blocks.py): residual blocks, then the remaining layers one by
one, in order. Start: per-channel MSE weight scales and MSE activation scales (the ``mse`` method). Then per
block, on the calibration images (real or synthetic):

1. the block's input is the output of the already reconstructed quantized prefix; its target is the float
   model's block output on the float input (computed alongside, one pass in all);
2. AdaRound (brecq_core): the rounding of every weight of the block is learned against the block-output squared
   error (``loss=fisher``: weighted by the squared gradients of the float model's loss at the block output),
   plus the rounding regulariser with beta 20 -> 2 after ``warmup``; the block's activation quantizers are on
   at their initial scales throughout;
3. hard rounding: the integer levels are set (exactly on the grid; the per-channel weight scales are unchanged);
4. the block's activation step sizes are learned (LSQ-style straight-through gradients, cosine lr).

``drop_prob`` > 0 adds QDrop (Wei et al., 2022) to both phases: each activation element inside the block keeps
its float value with that probability (fresh seeded masks every step), so the rounding is not fitted to one
activation rounding pattern; the block errors that decide what is kept are measured without it.

The weight and activation quantizers are the plan's (per-channel symmetric weights, per-tensor activations,
any widths of ``--bits``), so the recipe exports and runs in an INT8 engine like every other method's.

Budget: ``iters`` rounding and ``act_iters`` step-size iterations per block; ``time_budget`` caps the whole
run, split over the blocks that remain by their cost (multiply-accumulates), and each block's iteration count is
cut to what its share allows (measured on the first iterations). Resumable per block: a checkpoint in
``ctx.work_dir`` after each block; ``--resume`` continues at the next block (the interrupted block restarts).
Each phase's iterations run on the shared training loop (qexport/training/loop.py): its progress bar, and on
Ctrl-C the step under way finishes before the run stops.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from qexport.calibrators import register_calibrator
from qexport.duration import parse_duration
from qexport.calibrators.base import CalibrationContext, calibrate_activations, set_weight_scales
from qexport.calibrators.blocks import Block, block_module, find_blocks, layer_macs
from qexport.calibrators.brecq_core import (ActivationDrop, AdaRoundWeight, RoundingPhase, StepSizePhase,
                                           recon_loss)
from qexport.errors import QexportError
from qexport.training.loop import LoopConfig, TrainLoop

CHECKPOINT = "brecq.pt"


@dataclass(frozen=True)
class BrecqConfig:
    """Options of ``brecq`` (defaults chosen on held-out training images; paper settings in methods.md)."""

    iters: int = field(default=2000, metadata={"help": "rounding (AdaRound) iterations per block (paper: 20000)"})
    act_iters: int = field(default=1000, metadata={"help": "activation step-size iterations per block, 0 = keep "
                                                           "the MSE init (paper: 5000)"})
    batch_size: int = field(default=32, metadata={"help": "images per reconstruction step (paper: 32)"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the rounding variables"})
    act_lr: float = field(default=4e-4, metadata={"help": "Adam learning rate of the activation step sizes"})
    reg_weight: float = field(default=0.01, metadata={"help": "weight lambda of the rounding regulariser"})
    warmup: float = field(default=0.2, metadata={"help": "fraction of the rounding iterations without regulariser"})
    loss: str = field(default="mse", metadata={"help": "block-output loss: 'mse' or 'fisher' (squared error "
                                                       "weighted by squared output gradients)"})
    time_budget: Optional[str] = field(default=None, metadata={"help": "cap for the whole run, e.g. 15m; split "
                                                                       "over blocks by their cost"})
    drop_prob: float = field(default=0.0, metadata={"help": "QDrop: probability that an activation element skips "
                                                            "its quantizer during reconstruction (QDrop paper: "
                                                            "0.5); 0 = BRECQ as published"})

    @classmethod
    def contract_options(cls) -> dict:
        """A run of seconds on a tiny model, for the contract test (tests/test_contract.py)."""
        return {"iters": 4, "act_iters": 2, "batch_size": 4}

    def __post_init__(self) -> None:
        if self.iters <= 0:
            raise QexportError(f"--iters must be positive for brecq (rounding iterations per block), got {self.iters}")
        if self.act_iters < 0:
            raise QexportError(f"--act-iters must be >= 0, got {self.act_iters}")
        if self.batch_size <= 0:
            raise QexportError(f"--batch-size must be positive, got {self.batch_size}")
        if self.lr <= 0 or self.act_lr <= 0 or self.reg_weight < 0:
            raise QexportError("--lr and --act-lr must be positive and --reg-weight >= 0")
        if not 0.0 <= self.warmup < 1.0:
            raise QexportError(f"--warmup must be in [0, 1), got {self.warmup}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise QexportError(f"--drop-prob must be in [0, 1), got {self.drop_prob}")
        if self.loss not in ("mse", "fisher"):
            raise QexportError(f"--loss must be 'mse' or 'fisher' for brecq, got {self.loss!r}")
        budget = parse_duration(self.time_budget)
        if budget is not None and budget <= 0:
            raise QexportError(f"--time-budget must be positive, got {self.time_budget!r}")

    @property
    def budget_seconds(self) -> float | None:
        return parse_duration(self.time_budget)


def _batched(fn, x: torch.Tensor, bs: int = 128) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i : i + bs]) for i in range(0, x.shape[0], bs)])


def block_error(mod, xq: torch.Tensor, target: torch.Tensor, bs: int = 128) -> float:
    """Mean block-output squared error (summed over channels) over all images, no gradients."""
    tot = 0.0
    with torch.no_grad():
        for i in range(0, xq.shape[0], bs):
            tot += float(recon_loss(mod(xq[i : i + bs]), target[i : i + bs])) * min(bs, xq.shape[0] - i)
    return tot / xq.shape[0]


def _fisher(fmods: list, k: int, yf: torch.Tensor, bs: int = 64) -> torch.Tensor:
    """Squared gradients of the float model's cross-entropy (to its own prediction) at block k's output."""
    out = []
    for i in range(0, yf.shape[0], bs):
        z = yf[i : i + bs].detach().requires_grad_(True)
        h = z
        for m in fmods[k + 1 :]:
            h = m(h)
        loss = F.cross_entropy(h, h.detach().argmax(dim=1), reduction="sum") if h.dim() == 2 else h.pow(2).sum()
        (g,) = torch.autograd.grad(loss, z)
        out.append(g.pow(2))
    f = torch.cat(out)
    return f / f.mean().clamp(min=1e-20)  # mean 1: the regulariser weight keeps its meaning


def _iters_for(phase, want: int, seconds: float | None) -> int:
    """Iterations of ``phase`` that fit in ``seconds`` (timed on two probe forward/backward passes)."""
    if seconds is None or want == 0:
        return want
    x, t, fis = phase._batch()
    phase.gen.manual_seed(phase.gen.initial_seed())  # the probe does not move the batch sequence
    t0 = time.perf_counter()
    for _ in range(2):
        loss = recon_loss(phase.block(x), t, fis)
        loss.backward()
    for p in phase.params:
        p.grad = None
    per = (time.perf_counter() - t0) / 2 * 1.15  # optimiser step and batching
    return max(1, min(want, int(seconds / max(per, 1e-6))))


def _run_phase(phase, n: int, desc: str, quiet: bool) -> dict:
    """Run ``n`` iterations of a phase on the shared training loop (one epoch: its bar, its Ctrl-C handling).

    The phase keeps its own lr schedule and batch generator, so the iterations are the ones a bare loop would
    run. No loop checkpoint: brecq checkpoints per block, and an interrupted block restarts on ``--resume``.

    Returns:
        The phase's metric means over the iterations (empty when ``n`` is 0).
    """
    phase.total = n
    if n == 0:
        return {}
    loop = TrainLoop(phase, LoopConfig(name=desc, iters_per_epoch=n, epochs=1, show=("rec", "reg")), quiet=quiet)
    return loop.run()[-1]


def _block_quantizers(sim, block: Block, learnable_only: bool = True) -> list:
    """The block's activation quantizers (``learnable_only``: without those that share another point's scale)."""
    aqs = sim.act_quantizers()
    shared = {ap.name for ap in sim.plan.activations if ap.share_scale_with} if learnable_only else set()
    names = [n.target[3:] for n in block.nodes if n.op == "call_module" and str(n.target).startswith("qx_")]
    return [aqs[name] for name in names if name in aqs and name not in shared]


def _learn_rounding(sim, mod, block: Block, xq, yf, fisher, cfg: BrecqConfig, seed: int, seconds, label: str,
                    quiet: bool, rtn: float) -> tuple[int, float, float, bool]:
    """AdaRound on the block's layers, then hard rounding; round-to-nearest is kept if it is better on the
    calibration images. Returns (iterations, seconds used, block error, learned rounding kept)."""
    layers = {name: sim.gm.get_submodule(name) for name in block.layers}
    originals = {name: layer.weight_quantizer for name, layer in layers.items()}
    nearest = {name: layer.int_weight() for name, layer in layers.items()}
    rounders = []
    for layer in layers.values():
        layer.weight_quantizer = AdaRoundWeight(layer.weight_quantizer, layer.weight)
        rounders.append(layer.weight_quantizer)
    try:
        phase = RoundingPhase(mod, xq, yf, fisher, rounders, lr=cfg.lr, total=cfg.iters, batch_size=cfg.batch_size,
                              seed=seed, lam=cfg.reg_weight, warmup=cfg.warmup)
        with ActivationDrop(_block_quantizers(sim, block, False), cfg.drop_prob, seed + 7):
            n_round = _iters_for(phase, cfg.iters, seconds)
            t0 = time.perf_counter()
            _run_phase(phase, n_round, f"{label} rounding", quiet)
            used = time.perf_counter() - t0
    finally:
        for name, layer in layers.items():
            r = layer.weight_quantizer
            layer.weight_quantizer = originals[name]
            if isinstance(r, AdaRoundWeight):
                layer.set_quantized_weight(r.levels(), originals[name].scale.detach().clone())
    rounded = block_error(mod, xq, yf)
    if rounded <= rtn:
        return n_round, used, rounded, True
    for name, layer in layers.items():
        layer.set_quantized_weight(nearest[name], layer.weight_quantizer.scale.detach().clone())
    return n_round, used, rtn, False


def reconstruct_block(sim, mod, block: Block, xq, yf, fisher, cfg: BrecqConfig, seed: int,
                      seconds: float | None, label: str, quiet: bool) -> dict:
    """Learn the rounding, then the activation step sizes, of one block in place.

    Neither step may leave the block worse on the calibration images than before it: learned rounding that
    ends above round-to-nearest's error falls back to round-to-nearest, learned step sizes that end above the
    error before them fall back to the previous steps (``kept`` in the metrics says what stayed).

    Args:
        sim: the QuantSim.
        mod: the block as a module (block_module).
        block: the block.
        xq: its inputs on the quantized path (all images).
        yf: the float targets.
        fisher: Fisher weights or None.
        cfg: options.
        seed: seed of this block's batches.
        seconds: time share of this block (None: no budget).
        label: progress bar label.
        quiet: no bars.

    Returns:
        Block metrics: output error with round-to-nearest, after rounding, after step sizes; iterations.
    """
    t_start = time.perf_counter()
    rtn = block_error(mod, xq, yf)
    scales = [aq.scale for aq in _block_quantizers(sim, block)]
    act_iters = cfg.act_iters if scales else 0
    share = None if seconds is None else seconds * cfg.iters / (cfg.iters + act_iters)
    n_round, used, rounded, learned = _learn_rounding(sim, mod, block, xq, yf, fisher, cfg, seed, share, label,
                                                      quiet, rtn)
    n_act, final, steps_kept = 0, rounded, False
    if act_iters:
        before = [p.detach().clone() for p in scales]
        for p in scales:
            p.requires_grad_(True)
        step = StepSizePhase(mod, xq, yf, fisher, scales, lr=cfg.act_lr, total=act_iters,
                             batch_size=cfg.batch_size, seed=seed + 1, sync=sim.apply_shared_scales)
        with ActivationDrop(_block_quantizers(sim, block, False), cfg.drop_prob, seed + 8):
            n_act = _iters_for(step, act_iters, None if seconds is None else max(seconds - used, 0.0))
            t0 = time.perf_counter()
            _run_phase(step, n_act, f"{label} act steps", quiet)
            used += time.perf_counter() - t0
        for p in scales:
            p.requires_grad_(False)
        final = block_error(mod, xq, yf)
        steps_kept = final <= rounded
        if not steps_kept:
            with torch.no_grad():
                for p, v in zip(scales, before):
                    p.copy_(v)
            sim.apply_shared_scales()
            final = rounded
    return {"block": block.name, "residual": block.residual, "rtn_error": rtn, "rounded_error": rounded,
            "final_error": final, "iters": n_round, "act_iters": n_act,
            "kept": {"learned_rounding": learned, "learned_steps": steps_kept},
            "seconds": round(time.perf_counter() - t_start, 3), "loop_seconds": round(used, 3)}


def _checkpoint(ctx: CalibrationContext, state: dict) -> None:
    if ctx.work_dir is None:
        return
    path = ctx.work_dir / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _resume_state(ctx: CalibrationContext, cfg_json: str) -> dict | None:
    if not ctx.resume or ctx.work_dir is None or not (ctx.work_dir / CHECKPOINT).is_file():
        return None
    state = torch.load(ctx.work_dir / CHECKPOINT, weights_only=False)
    if state.get("config") != cfg_json:
        raise QexportError("--resume: the interrupted brecq run used other options; rerun without --resume")
    return state


def _shares(costs: list[float], k: int, remaining: float | None) -> float | None:
    if remaining is None:
        return None
    return max(remaining, 0.0) * costs[k] / max(sum(costs[k:]), 1e-9)


@register_calibrator("brecq", config=BrecqConfig, needs_data=True,
                     summary="block reconstruction: learned AdaRound rounding per residual block, then learned "
                             "activation steps (BRECQ)")
def calibrate_brecq(ctx: CalibrationContext, cfg: BrecqConfig) -> dict:
    """BRECQ calibration on ``ctx.data`` (real or synthetic images).

    Args:
        ctx: calibration context (needs data).
        cfg: options.

    Returns:
        Metrics: per-block output errors (round-to-nearest, rounded, final) and iterations, the block count.
    """
    if ctx.data is None:
        raise QexportError("--method brecq needs calibration images: pass --data DIR (real or synthetic)")
    started = time.time()
    sim = ctx.sim.to(ctx.device).eval()
    sim.requires_grad_(False)
    data = ctx.data.to(ctx.device)
    names = set(sim.layers())
    blocks = find_blocks(sim.gm, names)
    mods = [block_module(sim.gm, b) for b in blocks]
    folded = ctx.folded if ctx.device == "cpu" else copy.deepcopy(ctx.folded).to(ctx.device)
    fmods = [block_module(folded.eval(), b, float_path=True) for b in blocks]
    cfg_json = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    state = _resume_state(ctx, cfg_json)
    if state is None:
        set_weight_scales(sim, "mse")
        calibrate_activations(sim, data, "mse", quiet=ctx.quiet, seed=ctx.seed, device=ctx.device)
        state = {"next": 0, "elapsed": 0.0, "blocks": [], "config": cfg_json}
    else:
        sim.load_state_dict(state["sim"])
    macs = layer_macs(sim.gm, data, names)
    costs = [sum(macs.get(n, 0.0) for n in b.layers) + 1.0 for b in blocks]
    budget = cfg.budget_seconds
    xq = xf = data
    with torch.no_grad():
        for k in range(state["next"]):  # resume: the prefix again, on both paths
            xq, xf = _batched(mods[k], xq), _batched(fmods[k], xf)
    for k in range(state["next"], len(blocks)):
        yf = _batched(fmods[k], xf)
        fisher = _fisher(fmods, k, yf) if cfg.loss == "fisher" else None
        spent = state["elapsed"] + (time.time() - started)
        seconds = _shares(costs, k, None if budget is None else budget - spent)
        label = f"brecq {k + 1}/{len(blocks)} {blocks[k].name}"
        info = reconstruct_block(sim, mods[k], blocks[k], xq, yf, fisher, cfg, ctx.seed * 1000 + k, seconds,
                                 label, ctx.quiet)
        state["blocks"].append(info)
        xq, xf = _batched(mods[k], xq), yf
        state.update({"next": k + 1, "sim": sim.state_dict()})
        _checkpoint(ctx, {**state, "elapsed": state["elapsed"] + time.time() - started})
    sim.snap_weights()
    sim.apply_shared_scales()
    return {"blocks": len(blocks), "residual_blocks": sum(b.residual for b in blocks),
            "block_metrics": state["blocks"]}
