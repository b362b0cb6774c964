"""``--method mixmix``: data-free. Synthesize calibration images with a model zoo (MixMix feature and data
mixing, qexport/data/synthesize.py), then block reconstruction (``brecq``) on them; methods.md section 2.

The zoo is the target model plus every ``zoo`` entry (``MODEL[=WEIGHTS]``, the same specs and weight files as
``calibrate``); by default the target alone. The synthetic images are kept in the recipe folder
(``synthetic/``, an image folder any data-driven method takes as ``--data``). ``time_budget`` covers both
parts: ``synth_share`` of it for synthesis, the rest (whatever is left) for reconstruction. Both parts
checkpoint into the run's work folder, so ``--resume`` continues at the next synthesis batch or block.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from qexport.calibrators import register_calibrator
from qexport.duration import parse_duration
from qexport.calibrators.base import CalibrationContext
from qexport.calibrators.brecq import BrecqConfig, calibrate_brecq
from qexport.data.synthesize import SynthConfig
from qexport.errors import QexportError


@dataclass(frozen=True)
class MixMixConfig:
    """Options of ``mixmix`` (synthesis, then brecq)."""

    zoo: tuple[str, ...] = field(default=(), metadata={"help": "extra zoo models MODEL[=WEIGHTS] (or folders with a "
                                                               "zoo.txt); default: the target model alone"})
    synth_mode: str = field(default="mixmix", metadata={"help": "'mixmix' or 'bns' (single-model baseline)"})
    # 256 images and one zoo model per step: chosen on held-out training images (docs/brecq_mixmix.md); on a CPU
    # budget each image needs its synthesis steps more than brecq needs more images.
    num_images: int = field(default=256, metadata={"help": "synthetic calibration images"})
    synth_iters: int = field(default=500, metadata={"help": "synthesis steps per batch"})
    synth_batch_size: int = field(default=64, metadata={"help": "images synthesized together"})
    synth_zoo_per_step: int = field(default=1, metadata={"help": "zoo models run per synthesis step, drawn at "
                                                                 "random (0: all)"})
    iters: int = field(default=BrecqConfig.iters, metadata={"help": "brecq rounding iterations per block"})
    act_iters: int = field(default=BrecqConfig.act_iters, metadata={"help": "brecq step-size iterations per block"})
    batch_size: int = field(default=BrecqConfig.batch_size, metadata={"help": "brecq images per step"})
    loss: str = field(default="mse", metadata={"help": "brecq block loss: 'mse' or 'fisher'"})
    drop_prob: float = field(default=BrecqConfig.drop_prob, metadata={"help": "brecq's QDrop probability (0: off)"})
    time_budget: Optional[str] = field(default=None, metadata={"help": "cap for synthesis and reconstruction "
                                                                       "together, e.g. 30m"})
    synth_share: float = field(default=0.7, metadata={"help": "share of time_budget given to synthesis (the rest: "
                                                              "brecq); chosen on held-out training images"})


    @classmethod
    def contract_options(cls) -> dict:
        """A run of seconds on a tiny model, for the contract test (tests/test_contract.py)."""
        return {"num_images": 8, "synth_iters": 2, "synth_batch_size": 4, "iters": 4, "act_iters": 2, "batch_size": 4}

    def __post_init__(self) -> None:
        if not 0.0 < self.synth_share < 1.0:
            raise QexportError(f"--synth-share must be in (0, 1), got {self.synth_share}")
        if isinstance(self.zoo, str):  # one entry given as a plain string
            object.__setattr__(self, "zoo", (self.zoo,))
        self.synth_config(None)
        self.brecq_config(None)

    def synth_config(self, seconds: float | None) -> SynthConfig:
        """The synthesis half's options (``seconds``: its time cap)."""
        return SynthConfig(mode=self.synth_mode, num_images=self.num_images, iters=self.synth_iters,
                           batch_size=self.synth_batch_size, zoo_per_step=self.synth_zoo_per_step,
                           time_budget=None if seconds is None else f"{seconds:.3f}")

    def brecq_config(self, seconds: float | None) -> BrecqConfig:
        """The reconstruction half's options (``seconds``: its time cap)."""
        return BrecqConfig(iters=self.iters, act_iters=self.act_iters, batch_size=self.batch_size, loss=self.loss,
                           drop_prob=self.drop_prob,
                           time_budget=None if seconds is None else f"{max(seconds, 1.0):.3f}")


@register_calibrator("mixmix", config=MixMixConfig, needs_data=False,
                     summary="MixMix synthesis over a model zoo (--zoo), then brecq on the synthetic images")
def calibrate_mixmix(ctx: CalibrationContext, cfg: MixMixConfig) -> dict:
    """Synthesize with the zoo, keep the images in the recipe folder, then reconstruct block by block.

    Args:
        ctx: calibration context (no data: the method is data-free).
        cfg: options.

    Returns:
        Metrics: brecq's, plus the synthesis record (zoo, per-batch BN loss, seconds).
    """
    from qexport.training.synthesis_run import expand_zoo, load_zoo, run_synthesis, write_folder

    started = time.time()
    budget = parse_duration(cfg.time_budget)
    entries = expand_zoo(cfg.zoo)
    if cfg.synth_mode == "bns" and entries:
        raise QexportError("synth_mode bns inverts the target model alone; drop --zoo or use synth_mode mixmix")
    loaded = ctx.model
    members = load_zoo(loaded, loaded.spec, entries, ctx.device)
    work = None
    if ctx.work_dir is not None:
        work = ctx.work_dir / "synthesis"
        work.mkdir(parents=True, exist_ok=True)
    synth_cfg = cfg.synth_config(None if budget is None else budget * cfg.synth_share)
    try:
        pixels, labels, info = run_synthesis(members, loaded.num_classes, synth_cfg, ctx.seed, work, ctx.resume,
                                             ctx.quiet)
    finally:
        for m in members:
            m.stats.remove()
    synth_seconds = time.time() - started
    info.update({"zoo_entries": [f"{s}={w}" if w else s for s, w in entries], "seed": ctx.seed,
                 "options": dataclasses.asdict(synth_cfg), "real_images_read": 0})
    if ctx.artifact_dir is not None:
        classes = [f"{i:0{len(str(loaded.num_classes - 1))}d}" for i in range(loaded.num_classes)]
        write_folder(ctx.artifact_dir / "synthetic", pixels, labels, classes, info)
    pre = loaded.preprocess
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    data = (pixels - mean) / std
    brecq_work = None
    if ctx.work_dir is not None:
        brecq_work = ctx.work_dir / "brecq"
        brecq_work.mkdir(parents=True, exist_ok=True)
    left = None if budget is None else budget - (time.time() - started)
    bctx = dataclasses.replace(ctx, data=data, labels=labels, work_dir=brecq_work)
    metrics = calibrate_brecq(bctx, cfg.brecq_config(left))
    metrics["synthesis"] = {"zoo": info["zoo"], "seconds": round(synth_seconds, 2),
                            "bn_first": [b["bn_first"] for b in info["batches"]],
                            "bn_last": [b["bn_last"] for b in info["batches"]]}
    return metrics
