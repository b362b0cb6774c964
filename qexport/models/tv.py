"""The ``torchvision:<name>`` family: any torchvision classification builder, random weights."""

from __future__ import annotations

import torch.nn as nn

from qexport.errors import QexportError
from qexport.models.preprocess import IMAGENET_PRESET, Preprocess
from qexport.models.registry import register_model


def _names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


@register_model("torchvision", names=_names, description="torchvision classification models (random weights)")
def build_torchvision(name: str, num_classes: int | None = None) -> tuple[nn.Module, Preprocess, int]:
    """Build ``torchvision:<name>`` with random weights.

    Args:
        name: a torchvision classification builder name (``resnet18``, ``mobilenet_v2``, ...).
        num_classes: classifier outputs (default 1000).

    Returns:
        (model, the ImageNet preset: resize 256, crop 224, ImageNet mean/std, num_classes).
    """
    names = _names()
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
        raise QexportError(f"unknown torchvision classification model {name!r}; {hint}")
    import torchvision.models as tvm

    nc = 1000 if num_classes is None else int(num_classes)
    try:
        model = tvm.get_model(name, weights=None, num_classes=nc)
    except Exception as e:  # noqa: BLE001
        raise QexportError(f"building torchvision:{name} failed: {e}") from None
    return model, IMAGENET_PRESET, nc
