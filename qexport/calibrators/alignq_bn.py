"""BatchNorm on the aligned layers while AlignQ trains, folded into their scale and bias at the end.

Every qexport recipe folds BN before calibration, and the QAT trainer trains the folded network. For AlignQ that
is a poor fit: aligning a layer's weights changes its output statistics (each filter's mean is removed, its
largest weights are compressed), so the folded BN's fixed scale and shift no longer standardise the
pre-activation, and the activation alignment ``a * erf(x / sqrt 2)`` assumes a standardised ``x``. The paper
trains with BN. So each layer with aligned weights gets a :class:`ChannelBatchNorm` on its output for the run
(batch statistics in training, running statistics for held-out scoring), initialised to the float BN's shift and
scale magnitude. :func:`fold_channel_bn` then folds it into the layer: the integer levels keep their values
(a channel with a negative BN scale flips the sign of its levels, which the symmetric aligned grid allows), the
per-channel scale and the bias absorb the rest, so the recipe stays integer weights times per-channel scales.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from qexport.quant.fake_quant import channel_view

BN_MOMENTUM = 0.1
BN_EPS = 1e-5


class ChannelBatchNorm(nn.Module):
    """Per-channel batch normalisation of a layer's output (dim 1), with running statistics.

    Until the first batch it sees (training or not) it has no running statistics, so that batch's statistics
    are used and stored: the trainer's activation-range initialisation, run before training, then sees the
    network training starts from.

    Args:
        gamma: initial per-channel scale (the float BN's |gamma|).
        beta: initial per-channel shift (the float BN's beta).
    """

    def __init__(self, gamma: torch.Tensor, beta: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(gamma.detach().clone().float())
        self.bias = nn.Parameter(beta.detach().clone().float())
        self.register_buffer("running_mean", torch.zeros_like(self.weight.data))
        self.register_buffer("running_var", torch.ones_like(self.weight.data))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        first = not bool(self.initialised)
        self.initialised.fill_(True)
        return F.batch_norm(y, self.running_mean, self.running_var, self.weight, self.bias,
                            training=self.training or first, momentum=1.0 if first else BN_MOMENTUM, eps=BN_EPS)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The running-statistics affine map ``y -> gain * (y - mean) + bias`` as (gain, mean, bias)."""
        with torch.no_grad():
            return self.weight / torch.sqrt(self.running_var + BN_EPS), self.running_mean.clone(), self.bias.clone()


def attach_channel_bn(layer: nn.Module, bn: nn.Module) -> ChannelBatchNorm:
    """Put a :class:`ChannelBatchNorm` on ``layer``'s output, initialised from the float model's BN ``bn``.

    Args:
        layer: a QuantSim conv/linear layer (its output channels are dim 1).
        bn: the BatchNorm that followed it in the unfolded float model.

    Returns:
        The attached module (a submodule ``layer.train_bn``, so checkpoints and DDP carry it).
    """
    cbn = ChannelBatchNorm(bn.weight.detach().abs(), bn.bias.detach()).to(layer.weight.device)
    layer.train_bn = cbn
    layer._train_bn_hook = layer.register_forward_hook(lambda mod, inp, out: mod.train_bn(out))
    return cbn


def fold_channel_bn(layer: nn.Module, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove ``layer.train_bn`` and fold its running-statistics map into the layer's levels, scale and bias.

    ``gain * (conv(x, q * s) + b - mean) + beta = conv(x, sign(gain) q * |gain| s) + gain (b - mean) + beta``.

    Args:
        layer: a layer carrying ``train_bn`` (from :func:`attach_channel_bn`); its bias is replaced.
        q: its integer levels (on a grid symmetric about 0).
        scale: its per-channel scale.

    Returns:
        (levels, scale) to set on the layer; the bias is already set.
    """
    gain, mean, beta = layer.train_bn.folded()
    layer._train_bn_hook.remove()
    del layer.train_bn, layer._train_bn_hook
    sign = torch.where(gain < 0, -1.0, 1.0).to(q.device)
    with torch.no_grad():
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(gain), requires_grad=False)
        layer.bias.copy_(gain * (layer.bias - mean) + beta)
    return q * channel_view(sign, q.dim()).to(q.dtype), (scale * gain.abs()).clamp_min(1e-12)
