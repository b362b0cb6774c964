"""Helpers shared by the benchmark scripts beside this file (run as ``python bench/<script>.py``)."""

from __future__ import annotations

import torch


def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 500,
            device: str | torch.device | None = None) -> torch.Tensor:
    """Top-1 class of ``model`` (put in eval mode) for each image of ``x``.

    Args:
        model: any classifier returning logits.
        x: images (N, C, H, W) on the CPU.
        batch_size: images per forward.
        device: where the model runs (None: leave the batches on the CPU).

    Returns:
        int64 tensor (N,) on the CPU.
    """
    model.eval()
    with torch.no_grad():
        return torch.cat([model(xb if device is None else xb.to(device)).argmax(1).cpu()
                          for xb in x.split(batch_size)])


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
    return 100.0 * int((predict(model, x, batch_size, device) == y).sum()) / len(x)
