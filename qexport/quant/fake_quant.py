"""Fake quantization with straight-through gradients; round half to even like ONNX QuantizeLinear."""

from __future__ import annotations

import torch


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # torch.round rounds half to even, as QuantizeLinear does
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even with an identity gradient.

    Args:
        x: any tensor.

    Returns:
        Rounded tensor; the gradient passes straight through.
    """
    return _RoundSTE.apply(x)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / scale), qmin, qmax) * scale`` with straight-through rounding.

    Gradients flow to ``x`` inside the range (clamp zeroes them outside) and to ``scale`` (LSQ-style),
    so methods may learn step sizes.

    Args:
        x: tensor to quantize.
        scale: positive scale, broadcastable to ``x`` (per-tensor scalar or per-channel shaped).
        qmin: lowest integer level.
        qmax: highest integer level.

    Returns:
        The dequantized tensor, same shape as ``x``.
    """
    return torch.clamp(round_ste(x / scale), qmin, qmax) * scale


def quantize_to_int(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer levels of ``x`` (no gradient), as int8.

    Args:
        x: tensor to quantize.
        scale: positive scale broadcastable to ``x``.
        qmin: lowest level.
        qmax: highest level.

    Returns:
        int8 tensor of levels.
    """
    with torch.no_grad():
        return torch.clamp(torch.round(x / scale), qmin, qmax).to(torch.int8)


def channel_view(scale: torch.Tensor, ndim: int, axis: int = 0) -> torch.Tensor:
    """Reshape a 1-D per-channel scale to broadcast along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)
