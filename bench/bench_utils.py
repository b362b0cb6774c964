"""Helpers shared by the benchmark scripts beside this file (run as ``python bench/<script>.py``)."""

from __future__ import annotations

import torch


def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
         device: str | torch.device | None = None) -> float:
    """Top-1 accuracy in percent of ``model`` (put in eval mode) on images ``x`` with labels ``y``.

    Args:
        model: any classifier returning logits.
        x: images (N, C, H, W) on the CPU.
        y: int labels (N,) on the CPU.
        batch_size: images per forward.
        device: where the model runs (None: leave the batches on the CPU).

    Returns:
        Percent of images whose argmax is the label.
    """
    model.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            pred = model(xb if device is None else xb.to(device)).argmax(1).cpu()
            hits += int((pred == y[i : i + batch_size]).sum())
    return 100.0 * hits / len(x)
