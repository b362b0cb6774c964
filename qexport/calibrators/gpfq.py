"""``--method gpfq``: greedy path-following post-training weight quantization (paper 004,
../shared/docs/methods.md section 3).

Layer by layer in graph order. The float model and the partially quantized model are run side by side on the
calibration images by a node-by-node interpreter of the traced graph that keeps every live tensor of both
paths: it stops at each quantized layer, takes that layer's input on both paths (X and X~), unfolds it into
patches, samples them and accumulates ``H = X~^T X~`` and ``G = X~^T X``; GPFQ then chooses the integer levels
(gpfq_core), the layer is quantized, and the run goes on from there. Every node is executed once per path,
so the whole calibration costs about two forward passes plus the per-layer solves, never one pass per layer.

Alphabet: the layer's integer weight grid qmin..qmax (INT-b exactly); step size by eq. 19 with constant C,
per output channel by default (``--per-layer-step`` for the paper's single step). ``--c auto`` tries a small
grid of C on the calibration data and keeps, per channel (or per layer with a per-layer step), the C with the
smallest error ``||X w - X~ q||``. Bias correction (default on) adds the mean output error of the calibration
images to the bias. Activations, when the plan quantizes them, are calibrated afterwards (MSE) on the model
with GPFQ weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from qexport.calibrators import register_calibrator
from qexport.calibrators.base import CalibrationContext, calibrate_activations
from qexport.calibrators.gpfq_core import LayerStats, channel_errors, gpfq_accumulated, step_sizes
from qexport.calibrators.side_by_side import SideBySide
from qexport.errors import QexportError
from qexport.progress import progress_bar

AUTO_C_GRID = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0)


@dataclass(frozen=True)
class GPFQConfig:
    """Options of ``gpfq`` (each field's help is its CLI help: ``qexport calibrate --method gpfq --help``)."""

    patch_prob: float = field(default=0.25, metadata={
        "help": "probability of keeping each conv patch when accumulating the layer statistics (paper: 0.25)"})
    c: str | float = field(default="auto", metadata={
        "help": "step-size constant C of eq. 19, or 'auto' to search c_grid on the calibration data"})
    per_channel_step: bool = field(default=True, metadata={
        "off_flag": "--per-layer-step",
        "help": "one step size per output channel (default; better than the paper's single per-layer step)"})
    bias_correction: bool = field(default=True, metadata={
        "help": "add the mean output error on the calibration images to each layer's bias"})
    batch_size: int = field(default=128, metadata={"help": "images per chunk of the side-by-side float/quantized run"})
    patch_stride: str = field(default="kernel", metadata={
        "help": "'kernel' (the paper: patches with stride = kernel size) or 'layer' (the layer's own stride: "
                "every output position)"})
    c_grid: tuple[float, ...] = field(default=AUTO_C_GRID, metadata={
        "help": "the values of C tried by --c auto (comma-separated)"})
    act_mode: str = field(default="mse", metadata={
        "help": "activation range mode (mse, minmax or percentile) used afterwards when the plan quantizes "
                "activations"})

    def __post_init__(self) -> None:
        if not 0.0 < self.patch_prob <= 1.0:
            raise QexportError(f"--patch-prob must be in (0, 1], got {self.patch_prob}")
        if self.batch_size <= 0:
            raise QexportError(f"--batch-size must be positive, got {self.batch_size}")
        if self.patch_stride not in ("kernel", "layer"):
            raise QexportError(f"patch_stride must be 'kernel' or 'layer', got {self.patch_stride!r}")
        if self.act_mode not in ("mse", "minmax", "percentile"):
            raise QexportError(f"act_mode must be mse, minmax or percentile, got {self.act_mode!r}")
        if not self.c_grid or not all(math.isfinite(v) and v > 0 for v in self.c_grid):
            raise QexportError(f"c_grid must be positive numbers, got {self.c_grid!r}")
        self.c_values()  # validates c

    def c_values(self) -> tuple[float, ...]:
        """The C values to try: the grid for ``auto``, else the one given."""
        if isinstance(self.c, str) and self.c.strip().lower() == "auto":
            return tuple(float(v) for v in self.c_grid)
        try:
            val = float(self.c)
        except (TypeError, ValueError):
            raise QexportError(f"--c must be 'auto' or a positive number, got {self.c!r}") from None
        if not math.isfinite(val) or val <= 0:
            raise QexportError(f"--c must be 'auto' or a positive number, got {self.c!r}")
        return (val,)


# ---------------------------------------------------------------------------------------------------------------
# Layer inputs as sampled rows


def _conv_padding(layer: nn.Conv2d) -> tuple[int, int]:
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return 0, 0
        return tuple(d * (k - 1) // 2 for d, k in zip(layer.dilation, layer.kernel_size))  # 'same' (odd kernels)
    return tuple(layer.padding)


def _rows(layer: nn.Module, x: torch.Tensor, xq: torch.Tensor, cfg: GPFQConfig, gen: torch.Generator):
    """Sampled input rows of a layer on both paths, as (g, m, d) each."""
    if isinstance(layer, nn.Conv2d):
        pad = _conv_padding(layer)
        if layer.padding_mode != "zeros":
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            xq = F.pad(xq, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            pad = (0, 0)
        stride = layer.kernel_size if cfg.patch_stride == "kernel" else layer.stride
        g = layer.groups
        if tuple(layer.dilation) == (1, 1):
            # Strided views (no copy), then gather only the kept patches.
            (kh, kw), (sh, sw) = layer.kernel_size, stride
            views = []
            for t in (x, xq):
                if pad != (0, 0):
                    t = F.pad(t, (pad[1], pad[1], pad[0], pad[0]))
                views.append(t.unfold(2, kh, sh).unfold(3, kw, sw).permute(0, 2, 3, 1, 4, 5))  # B, oh, ow, C, kh, kw
            b, oh, ow = views[0].shape[:3]
            keep = torch.rand(b, oh, ow, generator=gen) < cfg.patch_prob
            if not bool(keep.any()):  # tiny feature maps: never sample nothing
                keep[:] = True
            keep = keep.to(x.device)
            dg = x.shape[1] * kh * kw // g
            out = []
            for v in views:
                rows = v[keep] if cfg.patch_prob < 1.0 else v.reshape(b * oh * ow, *v.shape[3:])
                m = rows.shape[0]
                out.append(rows.reshape(m, g, dg).transpose(0, 1))  # (g, m, dg)
            return out[0], out[1]
        kw_ = dict(kernel_size=layer.kernel_size, dilation=layer.dilation, padding=pad, stride=stride)
        px, pxq = F.unfold(x, **kw_), F.unfold(xq, **kw_)  # (B, C*kh*kw, L)
        b, d, L = px.shape
        keep = torch.rand(b, L, generator=gen) < cfg.patch_prob if cfg.patch_prob < 1.0 else None
        if keep is not None and not bool(keep.any()):
            keep[:] = True
        out = []
        for p in (px, pxq):
            p = p.view(b, g, d // g, L).permute(1, 0, 3, 2)  # (g, B, L, dg)
            p = p[:, keep.to(p.device)] if keep is not None else p.reshape(g, b * L, d // g)
            out.append(p)
        return out[0], out[1]
    d = x.shape[-1]
    return x.reshape(1, -1, d), xq.reshape(1, -1, d)


def _grouped_weight(layer: nn.Module) -> torch.Tensor:
    """The weight as (g, N/g, d/g)."""
    w = layer.weight.detach()
    g = layer.groups if isinstance(layer, nn.Conv2d) else 1
    return w.reshape(g, w.shape[0] // g, -1)


# ---------------------------------------------------------------------------------------------------------------
# One layer


def quantize_layer(w: torch.Tensor, st: LayerStats, bits: int, qmin: int, qmax: int, c_values: tuple[float, ...],
                   per_channel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """GPFQ for one layer, trying every C and keeping the best per channel (or per layer).

    Args:
        w: weights (g, N, d).
        st: the layer's accumulated moments.
        bits: weight bit width (for eq. 19).
        qmin: lowest level.
        qmax: highest level.
        c_values: C values to try.
        per_channel: per-channel steps and per-channel choice of C.

    Returns:
        (integer levels (g, N, d), steps (g, N), chosen C (g, N), info with the sampled relative error).
    """
    w64 = w.to(st.h.dtype)
    g, n, d = w64.shape
    nc = len(c_values)
    # Every C at once: the greedy runs independently per output row and H, G are shared, so the candidates
    # are stacked as extra rows (one pass of the column loop instead of one per C).
    deltas = torch.stack([step_sizes(w64, bits, c, per_channel) for c in c_values], 1)  # (g, nc, N)
    w_rep = w64[:, None].expand(g, nc, n, d).reshape(g, nc * n, d)
    k_all = gpfq_accumulated(w_rep, st.h, st.gm, deltas.reshape(g, nc * n), qmin, qmax)
    err_all, ref_all = channel_errors(w_rep, k_all * deltas.reshape(g, nc * n, 1), st)
    err_all, ref = err_all.view(g, nc, n), ref_all.view(g, nc, n)[:, 0]
    if per_channel:
        pick = err_all.argmin(1)  # (g, N)
    else:
        pick = err_all.sum((0, 2)).argmin().expand(g, n)
    k = k_all.view(g, nc, n, d).gather(1, pick[:, None, :, None].expand(g, 1, n, d))[:, 0]
    delta = deltas.gather(1, pick[:, None])[:, 0]
    err = err_all.gather(1, pick[:, None])[:, 0]
    cc = torch.tensor(c_values, dtype=torch.float64, device=w.device)[pick]
    rel = math.sqrt(float(err.sum()) / max(float(ref.sum()), 1e-30))
    return k, delta, cc, {"sampled_rel_error": rel}


# ---------------------------------------------------------------------------------------------------------------
# The calibrator


@register_calibrator("gpfq", config=GPFQConfig, needs_data=True,
                     summary="GPFQ greedy path-following weight quantization (paper 004), layer by layer on data")
def calibrate_gpfq(ctx: CalibrationContext, cfg: GPFQConfig) -> dict:
    """GPFQ calibration.

    Args:
        ctx: calibration context (needs calibration images).
        cfg: options.

    Returns:
        Metrics for the recipe: per-layer relative errors, chosen C, sample counts, time.
    """
    if ctx.data is None:
        raise QexportError("--method gpfq needs calibration images: pass --data DIR (an image folder)")
    if any(lp.weight.binary for lp in ctx.sim.plan.layers):
        raise QexportError("--method gpfq has no binary {-1, +1} alphabet (its grid is mid-tread, with 0); use "
                           "--method md or ste for 1-bit weights, or --bits w2a8 and up")
    started = time.time()
    sim, folded, device = ctx.sim, ctx.folded, ctx.device
    folded_device = next(iter(folded.parameters()), torch.zeros(0)).device
    sim.to(device).eval()
    folded.to(device).eval()
    layers = sim.layers()
    gen = torch.Generator().manual_seed(ctx.seed)
    chunks = [ctx.data[i : i + cfg.batch_size].to(device) for i in range(0, ctx.data.shape[0], cfg.batch_size)]
    runner = SideBySide(folded, sim.gm, chunks)
    layer_nodes = _layer_nodes(runner, layers)
    c_values = cfg.c_values()
    per_layer: dict[str, dict] = {}
    try:
        with torch.no_grad(), sim.quant_disabled(weights=True, acts=True), \
                progress_bar(len(layer_nodes), "gpfq", ctx.quiet) as bar:
            for idx, name in layer_nodes:
                per_layer[name] = info = _quantize_one_layer(runner, idx, layers[name], len(chunks), cfg,
                                                             c_values, gen)
                bar.advance(1, info=f"{name}: rel err {info['rel_error']:.4f}")
        runner.envs = []
    finally:
        folded.to(folded_device)
    gpfq_seconds = time.time() - started
    if sim.act_quantizers():
        calibrate_activations(sim, ctx.data, cfg.act_mode, batch_size=cfg.batch_size, quiet=ctx.quiet,
                              seed=ctx.seed, device=device)
    sim.snap_weights()
    errs = [v["rel_error"] for v in per_layer.values()]
    return {"weights": "gpfq", "activations": cfg.act_mode if sim.act_quantizers() else "float",
            "c": cfg.c if isinstance(cfg.c, str) else float(cfg.c), "patch_prob": cfg.patch_prob,
            "patch_stride": cfg.patch_stride, "per_channel_step": cfg.per_channel_step,
            "bias_correction": cfg.bias_correction,
            "mean_rel_error": round(sum(errs) / len(errs), 6), "max_rel_error": round(max(errs), 6),
            "gpfq_seconds": round(gpfq_seconds, 2), "layers": per_layer}


def _layer_nodes(runner: SideBySide, layers: dict) -> list[tuple[int, str]]:
    """``(graph position, name)`` of each quantized layer's first call, in graph order.

    Raises:
        QexportError: a quantized layer the traced graph never calls.
    """
    layer_nodes: list[tuple[int, str]] = []
    for i, n in enumerate(runner.nodes):
        if n.op == "call_module" and n.target in layers and all(n.target != t for _, t in layer_nodes):
            layer_nodes.append((i, n.target))
    missing = [name for name in layers if all(name != t for _, t in layer_nodes)]
    if missing:
        raise QexportError(f"gpfq: layers {', '.join(missing)} are not called in the traced graph")
    return layer_nodes


def _quantize_one_layer(runner: SideBySide, idx: int, layer: nn.Module, n_chunks: int, cfg: GPFQConfig,
                        c_values, gen: torch.Generator) -> dict:
    """Gather the layer's input statistics over every chunk, run GPFQ on it, set its weights, move on.

    Returns:
        The layer's metrics (relative error, bits, samples, chosen C, seconds, bias correction).
    """
    t0 = time.time()
    w = _grouped_weight(layer)
    st = None
    for c in range(n_chunks):
        runner.run_until(idx, c)
        x, xq = runner.inputs_of(idx, c)
        rx, rxq = _rows(layer, x, xq, cfg, gen)
        if st is None:
            st = LayerStats.zeros(rx.shape[0], rx.shape[2], device=rx.device)
        st.add(rx, rxq)
    runner.pos = idx
    spec = layer.weight_quantizer.spec
    k, delta, cc, info = quantize_layer(w, st, spec.bits, spec.qmin, spec.qmax, c_values, cfg.per_channel_step)
    layer.set_quantized_weight(k.reshape(layer.weight.shape), delta.reshape(layer.weight.shape[0]).float())
    info.update(_finish_layer(runner, idx, layer, cfg.bias_correction, n_chunks))
    runner.pos = idx + 1
    cflat = cc.flatten()
    info.update({"bits": spec.bits, "samples": st.m,
                 "c": round(float(cflat.mean()), 4) if cfg.per_channel_step else float(cflat[0]),
                 "seconds": round(time.time() - t0, 3)})
    if cfg.per_channel_step and len(c_values) > 1:
        info["c_range"] = [float(cflat.min()), float(cflat.max())]
    return info


def _finish_layer(runner: SideBySide, idx: int, layer: nn.Module, bias_correction: bool, n_chunks: int) -> dict:
    """Run the quantized layer on both paths, correct its bias, and measure its output error.

    The relative error is ``||X W - X~ Q|| / ||X W||`` over every output of every calibration image
    (after bias correction, which is included in the quantized output).
    """
    is_conv = isinstance(layer, nn.Conv2d)
    ch_dim = 1 if is_conv else -1
    n = layer.weight.shape[0]
    dev = layer.weight.device
    sum_d = torch.zeros(n, dtype=torch.float64, device=dev)
    sum_d2 = torch.zeros(n, dtype=torch.float64, device=dev)
    sum_ref2 = torch.zeros(n, dtype=torch.float64, device=dev)
    count = 0
    bias_f = runner.roots[0].get_submodule(runner.nodes[idx].target).bias
    for c in range(n_chunks):
        yf, yq = runner.run_node(idx, c)
        runner.free(idx, c)
        dims = [i for i in range(yf.dim()) if i != (ch_dim % yf.dim())]
        diff = yf - yq
        ref = yf
        if bias_f is not None:
            ref = ref - bias_f.view([-1 if i == ch_dim % yf.dim() else 1 for i in range(yf.dim())])
        sum_d += diff.sum(dims).double()
        sum_d2 += torch.linalg.vector_norm(diff, dim=dims).double().pow(2)
        sum_ref2 += torch.linalg.vector_norm(ref, dim=dims).double().pow(2)
        count += yf.numel() // n
    corr = torch.zeros_like(sum_d)
    info = {}
    if bias_correction and layer.bias is not None:
        corr = sum_d / max(count, 1)
        with torch.no_grad():
            layer.bias.add_(corr.to(layer.bias.dtype))
        node = runner.nodes[idx]
        for c in range(n_chunks):
            yq = runner.envs[c][1].get(node)
            if yq is not None:
                shape = [-1 if i == ch_dim % yq.dim() else 1 for i in range(yq.dim())]
                yq.add_(corr.to(yq.dtype).view(shape))
        info["bias_shift"] = round(float(corr.abs().mean()), 6)
    err2 = sum_d2 - 2 * corr * sum_d + count * corr.pow(2)
    info["rel_error"] = round(math.sqrt(max(float(err2.sum()), 0.0) / max(float(sum_ref2.sum()), 1e-30)), 6)
    return info
