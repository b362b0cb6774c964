"""What every calibrator receives, and the range statistics and scale searches they share."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from qexport.errors import QexportError
from qexport.progress import progress_bar
from qexport.quant.fake_quant import channel_view, fake_quant
from qexport.quant.quantsim import QuantSim
from qexport.training.distributed import SINGLE, DistInfo
from qexport.training.loop import Callbacks

# Activation clipping percentile of the ``percentile`` calibrator, chosen on held-out training images
# (bench/percentile_heldout.py; figures in bench/README.md).
DEFAULT_PERCENTILE = 99.999


@dataclass
class CalibrationContext:
    """Inputs of a calibrator.

    Attributes:
        sim: the QuantSim to calibrate in place (weights float, scales 1 at the start).
        folded: the BN-folded float model (the teacher / float path).
        model: the loaded float model (unfolded, with BN layers) and its metadata.
        data: calibration images (N, C, H, W), or None for data-free methods.
        labels: their labels (-1 when unlabeled), or None.
        seed: the run's seed.
        device: torch device for heavy work.
        quiet: no progress bars.
        artifact_dir: the recipe folder being written (temporary until the run succeeds): extra artifacts go here.
        work_dir: a persistent folder for checkpoints that survive an interrupted run (resume).
        resume: continue from the checkpoint in work_dir.
        dist: rank and world size under torchrun (training methods draw their share of the samples and average
            gradients; only rank 0 gets an artifact_dir).
        callbacks: named hooks of the training loop (benchmarks and tests; ``qexport.training.Callbacks``).
        data_dir: the labelled training folder of QAT methods (``needs_labels``), which read it themselves.
    """

    sim: QuantSim
    folded: torch.nn.Module
    model: object
    data: torch.Tensor | None
    labels: torch.Tensor | None
    seed: int = 0
    device: str = "cpu"
    quiet: bool = False
    artifact_dir: Path | None = None
    work_dir: Path | None = None
    resume: bool = False
    dist: DistInfo = SINGLE
    callbacks: Callbacks = field(default_factory=Callbacks)
    data_dir: Path | None = None


def config_from_options(config_cls: type, options: dict, method: str):
    """Build a method's frozen config from option values, rejecting options the method does not take.

    Args:
        config_cls: the dataclass.
        options: name -> value (None values are ignored: not given).
        method: method name for messages.

    Returns:
        The config instance.
    """
    from qexport.options import build_config

    return build_config(config_cls, {k: v for k, v in options.items() if v is not None}, f"--method {method}")


class RangeObserver:
    """Collects exact min/max and a bounded random sample of a tensor's values (for percentile/MSE searches).

    Args:
        max_samples: size of the kept sample (0: keep only min and max).
        generator: seeded generator for the subsampling.
    """

    def __init__(self, max_samples: int, generator: torch.Generator):
        self.max_samples, self.gen = max_samples, generator
        self.min, self.max = float("inf"), float("-inf")
        self.samples: list[torch.Tensor] = []
        self.count = 0

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))
        if self.max_samples <= 0:  # min/max only
            return
        per_call = max(self.max_samples // 16, 4096)
        if x.numel() > per_call:
            idx = torch.randint(0, x.numel(), (per_call,), generator=self.gen)
            x = x[idx]
        self.samples.append(x.cpu())
        self.count += x.numel()
        if self.count > 2 * self.max_samples:  # keep memory bounded: thin the pool
            pool = torch.cat(self.samples)
            keep = torch.randperm(pool.numel(), generator=self.gen)[: self.max_samples]
            self.samples, self.count = [pool[keep]], self.max_samples

    def values(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(1)


@contextlib.contextmanager
def observing(sim: QuantSim, max_samples: int = 1 << 18, seed: int = 0) -> Iterator[dict[str, RangeObserver]]:
    """Attach a RangeObserver to every activation quantizer (quantization left as it is).

    Args:
        sim: the QuantSim.
        max_samples: sample pool size per point.
        seed: subsampling seed.

    Returns:
        A context manager yielding point name -> observer.
    """
    gen = torch.Generator().manual_seed(seed)
    obs = {name: RangeObserver(max_samples, gen) for name in sim.act_quantizers()}
    for name, aq in sim.act_quantizers().items():
        aq.observer = obs[name]
    try:
        yield obs
    finally:
        for aq in sim.act_quantizers().values():
            aq.observer = None


def run_batches(model: torch.nn.Module, data: torch.Tensor, batch_size: int, description: str,
                quiet: bool, device: str = "cpu") -> None:
    """Run ``model`` over ``data`` in batches without gradients, with a progress bar.

    Args:
        model: any module.
        data: inputs (N, ...).
        batch_size: batch size.
        description: progress bar label.
        quiet: hide the bar.
        device: where to run.
    """
    n = data.shape[0]
    with torch.no_grad(), progress_bar((n + batch_size - 1) // batch_size, description, quiet) as bar:
        for i in range(0, n, batch_size):
            model(data[i : i + batch_size].to(device))
            bar.advance(1)


def weight_absmax_scale(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-output-channel min-max scale ``max|w| / qmax`` (never zero)."""
    amax = w.detach().abs().flatten(1).amax(dim=1)
    return torch.clamp(amax, min=1e-8) / qmax


# Exponent of the clipping error searched by the ``mse`` modes. Plain squared error (p = 2) clips outliers too
# hard: on ResNet-20 it cost 0.46 points at W8A8. p = 3 was the best of {2, 2.4, 3, 4, 6} at W4A8 and within
# 0.25 points of the best at W8A8, measured on 2,846 held-out *training* images (never on evaluation images).
DEFAULT_ERROR_NORM = 3.0


def weight_mse_scale(w: torch.Tensor, qmin: int, qmax: int, grid: int = 100, lo: float = 0.2,
                     p: float = DEFAULT_ERROR_NORM, binary: bool = False) -> torch.Tensor:
    """Per-output-channel scale minimising the L^p weight quantization error over clip ratios.

    Args:
        w: weight (out, ...).
        qmin: lowest level.
        qmax: highest level.
        grid: number of clip ratios tried in [lo, 1].
        lo: smallest clip ratio.
        p: error exponent (2 = squared error).
        binary: the binary grid {-1, +1} (searched down to 2 % of max |w|: its best scale is near mean |w|).

    Returns:
        Per-channel scales.
    """
    w = w.detach().flatten(1)
    lo = min(lo, 0.02) if binary else lo
    base = weight_absmax_scale(w, qmax)
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    for r in torch.linspace(lo, 1.0, grid):
        s = base * r
        err = (fake_quant(w, channel_view(s, 2), qmin, qmax, binary) - w).abs().pow(p).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def observed_amax(obs, signed: bool) -> float:
    """Largest magnitude a grid must cover: max |x| for signed grids, max(x, 0) for unsigned ones.

    ``obs`` is anything with ``min`` and ``max`` (a RangeObserver, AdaSG's EMA ranges; None counts as 0).
    """
    lo, hi = obs.min or 0.0, obs.max or 0.0
    return max(abs(lo), abs(hi)) if signed else max(hi, 0.0)


def act_scale_minmax(obs, signed: bool, qmin: int, qmax: int) -> float:
    """Per-tensor scale covering the observed range (symmetric for signed grids)."""
    return max(observed_amax(obs, signed) / qmax, 1e-8)


class HistogramObserver:
    """Histogram of every value of |x| (signed points) or max(x, 0) (unsigned) on [0, ``top``].

    A percentile in the far tail (99.99 %) needs all values: a 131k-value sample holds only ~13 values above it,
    so its estimate moved from run to run. ``bins`` fine bins keep the error far below one 8-bit step.

    Args:
        top: upper end of the range (the exact max from a first pass).
        signed: fold negative values (|x|) or clip them to 0.
        bins: number of bins.
    """

    def __init__(self, top: float, signed: bool, bins: int = 1 << 14):
        self.top, self.signed, self.bins = max(top, 1e-12), signed, bins
        self.counts = torch.zeros(bins, dtype=torch.float64)

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        v = x.abs() if self.signed else x.clamp(min=0)
        self.counts += torch.histc(v.cpu(), bins=self.bins, min=0.0, max=self.top).double()

    def percentile(self, pct: float) -> float:
        """Value below which ``pct`` % of the observed values lie (linear inside a bin)."""
        total = float(self.counts.sum())
        if total == 0:
            return 0.0
        cdf = torch.cumsum(self.counts, 0)
        target = pct / 100.0 * total
        i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64)).clamp(max=self.bins - 1))
        below = float(cdf[i - 1]) if i > 0 else 0.0
        frac = (target - below) / max(float(self.counts[i]), 1.0)
        return (i + min(max(frac, 0.0), 1.0)) * self.top / self.bins


def act_scale_percentile(obs: RangeObserver, hist: HistogramObserver, qmax: int, pct: float) -> float:
    """Scale that clips at the ``pct`` percentile of |x| (signed) or x (unsigned), from a full histogram."""
    amax = hist.percentile(pct)
    amax = amax if amax > 0 else max(abs(obs.min), abs(obs.max), 1e-8)
    return max(amax / qmax, 1e-8)


def act_scale_mse(obs: RangeObserver, signed: bool, qmin: int, qmax: int, grid: int = 100,
                  p: float = DEFAULT_ERROR_NORM) -> float:
    """Scale minimising the L^p quantization error of the sampled values over clip ratios."""
    v = obs.values()
    base = act_scale_minmax(obs, signed, qmin, qmax)
    best, best_err = base, float("inf")
    for r in torch.linspace(0.1, 1.0, grid):
        s = torch.tensor(base * float(r))
        err = float((fake_quant(v, s, qmin, qmax) - v).abs().pow(p).mean())
        if err < best_err:
            best, best_err = float(s), err
    return max(best, 1e-8)


def set_weight_scales(sim: QuantSim, mode: str = "mse") -> None:
    """Set every layer's per-channel weight scale by ``minmax`` or ``mse``.

    Args:
        sim: the QuantSim.
        mode: ``minmax`` or ``mse``.
    """
    for layer in sim.layers().values():
        spec = layer.weight_quantizer.spec
        if mode == "mse":
            s = weight_mse_scale(layer.weight, spec.qmin, spec.qmax, binary=spec.binary)
        else:
            s = weight_absmax_scale(layer.weight, spec.qmax)
        with torch.no_grad():
            layer.weight_quantizer.scale.copy_(s)


def calibrate_activations(sim: QuantSim, data: torch.Tensor, mode: str, *, batch_size: int = 64,
                          percentile: float = DEFAULT_PERCENTILE, quiet: bool = False, seed: int = 0,
                          device: str = "cpu") -> None:
    """Observe activation ranges on ``data`` (float path) and set per-tensor scales.

    Args:
        sim: the QuantSim; its activation quantizers are disabled while observing.
        data: calibration inputs.
        mode: ``minmax``, ``percentile`` or ``mse``.
        batch_size: batch size.
        percentile: the percentile for ``percentile`` mode.
        quiet: hide the progress bar.
        seed: subsampling seed.
        device: where to run.
    """
    if not sim.act_quantizers():
        return
    pool = 1 << 18 if mode == "mse" else 0  # only the mse search reads a sample of the values
    with observing(sim, max_samples=pool, seed=seed) as obs, sim.quant_disabled(weights=False, acts=True):
        run_batches(sim, data, batch_size, "observing activation ranges", quiet, device)
    hists: dict[str, HistogramObserver] = {}
    if mode == "percentile":  # second pass: the max is known now, so one fixed-range histogram per point
        for name, aq in sim.act_quantizers().items():
            hists[name] = aq.observer = HistogramObserver(observed_amax(obs[name], aq.spec.signed), aq.spec.signed)
        try:
            with sim.quant_disabled(weights=False, acts=True):
                run_batches(sim, data, batch_size, "activation histograms", quiet, device)
        finally:
            for aq in sim.act_quantizers().values():
                aq.observer = None
    for name, aq in sim.act_quantizers().items():
        sp = aq.spec
        if aq.kind == "erf":  # aligned (AlignQ) points have fixed scales: gain / n out, saturation / 255 in
            continue
        if mode == "minmax":
            s = act_scale_minmax(obs[name], sp.signed, sp.qmin, sp.qmax)
        elif mode == "percentile":
            s = act_scale_percentile(obs[name], hists[name], sp.qmax, percentile)
        elif mode == "mse":
            s = act_scale_mse(obs[name], sp.signed, sp.qmin, sp.qmax)
        else:
            raise QexportError(f"unknown activation range mode {mode!r}")
        with torch.no_grad():
            aq.scale.fill_(s)
    sim.apply_shared_scales()
