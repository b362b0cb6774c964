"""Marker ops: QuantSim in export mode emits them, the exporter replaces each with the target's Q/DQ nodes.

Each marker is an identity in PyTorch and a ``qexport.*`` custom node in the traced ONNX graph carrying the
plan name, so the exporter knows exactly which tensor and which layer it stands for (no guessing by graph
pattern, no constant folding of weights by the ONNX exporter).
"""

from __future__ import annotations

import torch

DOMAIN = "qexport"


class _ActMarker(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, name):  # noqa: ARG004
        return x.clone()

    @staticmethod
    def symbolic(g, x, name):
        out = g.op(f"{DOMAIN}::ActQDQ", x, point_s=name)
        out.setType(x.type())
        return out


class _WeightMarker(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, name):  # noqa: ARG004
        return w.clone()

    @staticmethod
    def symbolic(g, w, name):
        out = g.op(f"{DOMAIN}::WeightDQ", w, layer_s=name)
        out.setType(w.type())
        return out


class _BiasMarker(torch.autograd.Function):
    @staticmethod
    def forward(ctx, b, name):  # noqa: ARG004
        return b.clone()

    @staticmethod
    def symbolic(g, b, name):
        out = g.op(f"{DOMAIN}::BiasDQ", b, layer_s=name)
        out.setType(b.type())
        return out


def act_marker(x: torch.Tensor, name: str) -> torch.Tensor:
    """Identity that marks activation point ``name`` in the exported graph."""
    return _ActMarker.apply(x, name)


def weight_marker(w: torch.Tensor, name: str) -> torch.Tensor:
    """Identity that marks the weight of layer ``name`` in the exported graph."""
    return _WeightMarker.apply(w, name)


def bias_marker(b: torch.Tensor, name: str) -> torch.Tensor:
    """Identity that marks the bias of layer ``name`` in the exported graph."""
    return _BiasMarker.apply(b, name)
