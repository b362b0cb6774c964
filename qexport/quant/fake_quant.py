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


def binary_levels(v: torch.Tensor) -> torch.Tensor:
    """The binary grid's level of ``v`` (in units of the scale): +1 where ``v >= 0``, else -1 (no zero level)."""
    return torch.where(v >= 0, torch.ones_like(v), -torch.ones_like(v))


def fake_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, binary: bool = False) -> torch.Tensor:
    """``clamp(round(x / scale), qmin, qmax) * scale`` with straight-through rounding.

    Gradients flow to ``x`` inside the range (clamp zeroes them outside) and to ``scale`` (LSQ-style),
    so methods may learn step sizes. ``binary`` (the signed 1-bit grid {-1, +1}) takes the sign instead of
    rounding (0 goes to +1), with the same straight-through gradient inside [-scale, scale].

    Args:
        x: tensor to quantize.
        scale: positive scale, broadcastable to ``x`` (per-tensor scalar or per-channel shaped).
        qmin: lowest integer level.
        qmax: highest integer level.
        binary: the binary grid {-1, +1} (see QuantSpec.binary).

    Returns:
        The dequantized tensor, same shape as ``x``.
    """
    if binary:
        v = torch.clamp(x / scale, -1.0, 1.0)
        return (v + (binary_levels(v) - v).detach()) * scale
    return torch.clamp(round_ste(x / scale), qmin, qmax) * scale


def quantize_to_int(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, binary: bool = False) -> torch.Tensor:
    """Integer levels of ``x`` (no gradient), as int8.

    Args:
        x: tensor to quantize.
        scale: positive scale broadcastable to ``x``.
        qmin: lowest level.
        qmax: highest level.
        binary: the binary grid {-1, +1}: the sign, 0 to +1.

    Returns:
        int8 tensor of levels.
    """
    with torch.no_grad():
        if binary:
            return binary_levels(x / scale).to(torch.int8)
        return torch.clamp(torch.round(x / scale), qmin, qmax).to(torch.int8)


def channel_view(scale: torch.Tensor, ndim: int, axis: int = 0) -> torch.Tensor:
    """Reshape a 1-D per-channel scale to broadcast along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)
