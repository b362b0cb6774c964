"""Marker ops: QuantSim in export mode emits them, the exporter replaces each with the target's Q/DQ nodes.

Each marker is an identity in PyTorch and a ``qexport.*`` custom node in the traced ONNX graph carrying the
plan name, so the exporter knows exactly which tensor and which layer it stands for (no guessing by graph
pattern, no constant folding of weights by the ONNX exporter).
"""

from __future__ import annotations

import torch

DOMAIN = "qexport"


def _marker(op: str, attr: str) -> type:
    """An identity autograd Function that traces to ``qexport::<op>`` with the plan name as attribute."""

    def forward(ctx, x, name):  # noqa: ARG001
        return x.clone()

    def symbolic(g, x, name):
        out = g.op(f"{DOMAIN}::{op}", x, **{f"{attr}_s": name})
        out.setType(x.type())
        return out

    return type(f"_{op}Marker", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "symbolic": staticmethod(symbolic)})


_ActMarker = _marker("ActQDQ", "point")
_AlignedMarker = _marker("AlignedActQDQ", "point")
_WeightMarker = _marker("WeightDQ", "layer")
_BiasMarker = _marker("BiasDQ", "layer")


def act_marker(x: torch.Tensor, name: str) -> torch.Tensor:
    """Identity that marks activation point ``name`` in the exported graph."""
    return _ActMarker.apply(x, name)


def aligned_marker(x: torch.Tensor, name: str) -> torch.Tensor:
    """Identity that marks aligned (erf) activation point ``name`` in the exported graph."""
    return _AlignedMarker.apply(x, name)


def weight_marker(w: torch.Tensor, name: str) -> torch.Tensor:
    """Identity that marks the weight of layer ``name`` in the exported graph."""
    return _WeightMarker.apply(w, name)


def bias_marker(b: torch.Tensor, name: str) -> torch.Tensor:
    """Identity that marks the bias of layer ``name`` in the exported graph."""
    return _BiasMarker.apply(b, name)
