"""Do label-free losses predict top-1 for per-layer weight widths? ResNet-20, mse weight scales, activations float.

    python bench/mixed_precision_proxies.py

For uniform 4/5/6/8-bit weights, the greedy allocation at 4.5 mean bits (``--allocator greedy``, measured on 256
calibration images) and three random allocations at 4.5 bits from {4, 6, 8} (bench/mixed_precision.py's rule):
output KL and logit MSE against the float model on those 256 calibration images and on 2,000 held-out training
images outside the 512-image calibration subset, top-1 agreement with the float model on both, and top-1 on the
held-out images. A proxy is useful for allocation if it orders the allocations as held-out top-1 does.

    python bench/mixed_precision_proxies.py --per-layer 4,5

``--per-layer`` instead quantizes one layer at a time (the rest float) at each given width and prints its
held-out top-1 and logit MSE against the float model: which layer makes a wider uniform width lose top-1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from mixed_precision import heldout_training, random_allocation  # noqa: E402

import torch  # noqa: E402

from qexport.data import load_tensor  # noqa: E402
from qexport.mixed.greedy import MixedWidthModel, fake_quantized_weights, greedy_allocation  # noqa: E402
from qexport.mixed.sensitivity import output_loss  # noqa: E402
from qexport.models import fold_batchnorm, load_model  # noqa: E402
from qexport.shared import cifar_checkpoint, cifar_images  # noqa: E402


def top1(logits, labels) -> float:
    """Top-1 in percent of ``logits`` against ``labels``."""
    return 100 * float((logits.argmax(1) == labels).double().mean())


def per_layer_table(folded, quantized: dict, x_held, y_held, widths: list[int]) -> None:
    """Print held-out top-1 and logit MSE with one layer at a time fake-quantized at each width, the rest float.

    Args:
        folded: the BN-folded float model.
        quantized: width -> layer -> fake-quantized weight (``fake_quantized_weights``).
        x_held: held-out images.
        y_held: their labels.
        widths: the widths to compare.
    """
    model = MixedWidthModel(folded, quantized, x_held, "kl", 500)
    original = {n: folded.get_submodule(n).weight.detach().clone() for n in quantized[widths[0]]}
    print("| layer | " + " | ".join(f"top-1 / logit MSE at {w} bits" for w in widths) + " |")
    print("|---|" + "---|" * len(widths))
    print(f"| none (float) | {top1(model.ref, y_held):.2f} |")
    for name, weight in original.items():
        cells = []
        for w in widths:
            model.set(name, w)
            out = model.logits()
            cells.append(f"{top1(out, y_held):.2f} / "
                         f"{float(((out - model.ref) ** 2).mean()):.4f}")
            with torch.no_grad():
                model.model.get_submodule(name).weight.copy_(weight)
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-layer", default=None, help="widths, e.g. 4,5: one layer at a time instead")
    args = ap.parse_args(argv)
    train, ckpt = cifar_images("train"), cifar_checkpoint(20)
    if train is None or ckpt is None:
        print("shared folder with CIFAR-10 images / ResNet-20 checkpoint not found; nothing to measure")
        return 0
    loaded = load_model("cifar:resnet20", str(ckpt))
    folded, pre = fold_batchnorm(loaded.model), loaded.preprocess
    x_cal = load_tensor(train, pre, num_samples=512, seed=0)[0][:256]
    x_held, y_held = heldout_training(train, pre, 512, 2000)
    if args.per_layer:
        widths = [int(w) for w in args.per_layer.split(",")]
        per_layer_table(folded, fake_quantized_weights(folded, "onnxruntime", widths, ()), x_held, y_held, widths)
        return 0
    quantized = fake_quantized_weights(folded, "onnxruntime", (4, 5, 6, 8), ())
    numel = {n: t.numel() for n, t in quantized[4].items()}
    total = sum(numel.values())
    cal, held = MixedWidthModel(folded, quantized, x_cal, "kl", 128), MixedWidthModel(folded, quantized, x_held, "kl", 500)
    allocs = {f"uniform {b}": {n: b for n in numel} for b in (4, 5, 6, 8)}
    allocs["greedy 4.5"] = greedy_allocation(folded, "onnxruntime", x_cal, 4.5 * total, quiet=True)["widths"]
    allocs.update({f"random 4.5 seed {s}": random_allocation(numel, 4.5, s) for s in range(3)})
    print("| allocation | mean bits | KL cal | KL held-out | MSE cal | agreement cal | agreement held-out | "
          "top-1 held-out |\n|---|---|---|---|---|---|---|---|")
    for name, alloc in allocs.items():
        for n, w in alloc.items():
            cal.set(n, w)
            held.set(n, w)
        out_cal, out_held = cal.logits(), held.logits()
        agree = lambda m, o: top1(o, m.ref.argmax(1))  # noqa: E731
        print(f"| {name} | {sum(numel[n] * w for n, w in alloc.items()) / total:.3f} | "
              f"{output_loss(cal.ref, out_cal, 'kl'):.4f} | {output_loss(held.ref, out_held, 'kl'):.4f} | "
              f"{output_loss(cal.ref, out_cal, 'mse'):.3f} | {agree(cal, out_cal):.2f} | {agree(held, out_held):.2f} | "
              f"{top1(out_held, y_held):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
