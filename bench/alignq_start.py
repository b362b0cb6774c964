"""Where AlignQ training starts: held-out top-1 of ResNet-20 W4A4 right after each alignment, before any step.

    python bench/alignq_start.py [--images 3000] [--warm-starts]

AlignQ deploys a different network from the float one (docs/alignq.md): CDF-aligned weights (integers
``round(n * erf(z / sqrt 2))`` of the standardised weights, a least-squares per-channel scale) and Erf-aligned
activations. This measures what each alignment costs the pretrained network before training, against the plan's
uniform quantizers (``ste``'s start: mse weight scales, percentile activation scales), on the trainer's own
held-out share of a seeded subset of the shared training images (never test-dev). First and last layer 8-bit.

``--warm-starts`` adds attempts to start AlignQ closer to the pretrained network (none is in the method): latent
weights set by the inverse map, ``sqrt 2 erfinv(w / A)`` with ``A`` per channel such that their standard
deviation is 1, so that their alignment reproduces ``w / A`` as far as the standardisation allows; each layer's
per-channel scale and bias refit in order so that its output matches the float network's on 256 training-split
images (a least-squares affine fit, the aligned prefix as input); and both.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("QEXPORT_SHARED", REPO.parent / "shared"))
WEIGHTS = SHARED / "models/cifar10/resnet20-12fca82f.th"
TRAIN = SHARED / "data/cifar10/train"
WARM_STARTS = {(True, False): "inverse-map latent weights", (False, True): "output refit",
               (True, True): "inverse map + output refit"}  # (inverse map, output refit) -> row label
VARIANTS = {"uniform (ste)": None, "weights aligned": {"align": "weights"},
            "activations aligned": {"align": "activations"}, "both aligned (alignq)": {}}


def inverse_latent(w, iters: int = 40):
    """Latent weights whose CDF alignment is ``w / A`` per output channel (``A`` found by bisection)."""
    import torch

    flat = w.reshape(w.shape[0], -1).double()
    lo, hi = flat.abs().amax(1, keepdim=True) * 1.0001, flat.abs().amax(1, keepdim=True) * 100

    def latent(a):
        return math.sqrt(2) * torch.erfinv((flat / a).clamp(-0.999999, 0.999999))

    for _ in range(iters):  # std(latent) falls as A grows: find A with std 1
        mid = (lo + hi) / 2
        big = latent(mid).std(1, unbiased=False, keepdim=True) > 1
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    return latent(hi).reshape(w.shape).float()


def warm_start(task, inverse: bool, refit: bool) -> None:
    """Inverse-map every aligned layer's latent weights (least-squares scales) and/or refit scale and bias."""
    import torch

    from qexport.calibrators.alignq_core import AlignedWeightQuantizer, aligned_levels, fit_channel_scale

    sim = task.sim
    layers = {n: l for n, l in sim.layers().items() if isinstance(l.weight_quantizer, AlignedWeightQuantizer)}
    x = task.split.in_memory[0][task.split.train_idx[:256]]
    ref = float_outputs(sim, x, layers) if refit else None  # before the latent weights replace the float ones
    errors = []  # per layer: relative error of the aligned weights against the pretrained ones, before / after
    with torch.no_grad():
        for layer in layers.values() if inverse else ():
            w, wq = layer.weight.detach().clone(), layer.weight_quantizer
            before = float((wq(w) - w).norm() / w.norm())
            layer.weight.copy_(inverse_latent(w))
            wq.scale.copy_(fit_channel_scale(w, aligned_levels(layer.weight, wq.n, wq.per_channel)))
            errors.append((before, float((wq(layer.weight) - w).norm() / w.norm())))
    if errors:
        print(f"    (aligned-weight relative error per layer: {min(e[0] for e in errors):.2f}-"
              f"{max(e[0] for e in errors):.2f} plain, {min(e[1] for e in errors):.2f}-"
              f"{max(e[1] for e in errors):.2f} after the inverse map)", flush=True)
    if refit:
        refit_outputs(sim, x, layers, ref)
    task._init_scales()


def float_outputs(sim, x, layers: dict) -> dict:
    """Each layer's output in the float network (cloned: an in-place ReLU follows)."""
    import torch

    sim.eval()
    ref = {}
    hooks = [l.register_forward_hook(lambda m, i, o, n=n: ref.__setitem__(n, o.clone())) for n, l in layers.items()]
    with torch.no_grad(), sim.quant_disabled():
        sim(x)
    for h in hooks:
        h.remove()
    return ref


def refit_outputs(sim, x, layers: dict, ref: dict) -> None:
    """Per layer, in order: per-channel scale a and bias b minimising ||float output - (a * conv + b)||^2, with the
    aligned-weight prefix as input and activations in float (their scales are set again afterwards)."""
    import torch

    sim.eval()
    got = {}
    with torch.no_grad():
        for name, layer in layers.items():
            h = layer.register_forward_hook(lambda m, i, o: got.__setitem__("y", o.clone()))
            with sim.quant_disabled(weights=False, acts=True):
                sim(x)
            h.remove()
            view = [1, -1] + [1] * (got["y"].dim() - 2)
            dims = [0] + list(range(2, got["y"].dim()))
            core = got["y"] - (layer.bias.view(view) if layer.bias is not None else 0)
            cq, cf = core - core.mean(dims, keepdim=True), ref[name] - ref[name].mean(dims, keepdim=True)
            a = ((cq * cf).sum(dims) / (cq * cq).sum(dims).clamp_min(1e-12)).clamp(1e-3, 1e3)  # dead channels
            layer.weight_quantizer.scale.mul_(a)
            if layer.bias is not None:
                layer.bias.copy_((ref[name] - a.view(view) * core).mean(dims))


def start_top1(options: dict | None, images: int, warm: tuple[bool, bool] | None = None) -> float:
    """Held-out top-1 (%) of the QAT trainer's network before its first step."""
    from qexport.calibrators.alignq import AlignQConfig, AlignQMethod, aligned_quantsim
    from qexport.calibrators.base import CalibrationContext
    from qexport.calibrators.qat import QATConfig
    from qexport.calibrators.qat_task import QATTask
    from qexport.calibrators.ste import SteMethod
    from qexport.models import fold_batchnorm, load_model
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.quant.spec import BitsConfig

    loaded = load_model("cifar:resnet20", str(WEIGHTS))
    folded = fold_batchnorm(loaded.model)
    sim = QuantSim(folded, build_plan(folded, "onnxruntime", BitsConfig.parse("w4a4", 8)))
    ctx = CalibrationContext(sim=sim, folded=folded, model=loaded, data=None, labels=None, seed=0, quiet=True,
                             data_dir=TRAIN)
    common = {"max_images": images, "val_fraction": 0.34}
    if options is None:
        task = QATTask(ctx, QATConfig(**common), SteMethod())
    else:
        cfg = AlignQConfig(**common, admm=False, **options)
        ctx.sim, points = aligned_quantsim(ctx, cfg)
        task = QATTask(ctx, cfg, AlignQMethod(cfg, points))
        if warm:
            warm_start(task, *warm)
    return task.evaluate()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3000, help="seeded subset of the training images (a third held out)")
    ap.add_argument("--warm-starts", action="store_true", help="also the inverse-map warm starts (docstring)")
    args = ap.parse_args()
    if not WEIGHTS.is_file() or not TRAIN.is_dir():
        print(f"needs the shared ResNet-20 checkpoint and images under {SHARED}", file=sys.stderr)
        return 2
    print("| network at step 0 (W4A4, first/last 8-bit) | held-out top-1 |\n|---|---|")
    for name, options in VARIANTS.items():
        print(f"| {name} | {start_top1(options, args.images):.2f} % |", flush=True)
    if args.warm_starts:
        for name, options in (("weights aligned", {"align": "weights"}), ("both aligned (alignq)", {})):
            for warm, label in WARM_STARTS.items():
                print(f"| {name}, {label} | {start_top1(options, args.images, warm):.2f} % |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
