"""``load_model(spec)``: a float model in eval mode with its preprocessing, from any supported spec."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from qexport.errors import QexportError
from qexport.models.preprocess import IMAGENET_MEAN, IMAGENET_PRESET, IMAGENET_STD, Preprocess
from qexport.models.registry import families, get
from qexport.models.weights import apply_state_dict, read_state_dict, sha256_file


@dataclass
class LoadedModel:
    """A float model ready for calibration.

    Args:
        model: the module (eval mode, float32, CPU).
        spec: the spec it was loaded from.
        weights: path of the weights file, or None (random or built-in weights).
        weights_sha256: SHA-256 of the weights file, or None.
        preprocess: how images become inputs.
        num_classes: classifier outputs, when known.
        input_shape: (C, H, W).
    """

    model: nn.Module
    spec: str
    weights: str | None
    weights_sha256: str | None
    preprocess: Preprocess
    num_classes: int | None
    input_shape: tuple[int, int, int]


def _last_linear_out(model: nn.Module) -> int | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else None


def _from_factory(spec: str) -> tuple[nn.Module, Preprocess | None]:
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise QexportError(
                f"unknown model spec {spec!r}: no model family {mod_name!r} (known: {', '.join(families())}) and no "
                f"importable module {mod_name!r}; use family:name, package.module:factory or a .pt2 file"
            ) from None
        raise QexportError(f"importing {mod_name} for model spec {spec!r} failed: {e}; install what it needs") from None
    except Exception as e:  # noqa: BLE001 - arbitrary user code
        raise QexportError(f"importing {mod_name} for model spec {spec!r} failed: {type(e).__name__}: {e}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise QexportError(f"module {mod_name} has no attribute {attr!r}; check the factory name in {spec!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise QexportError(f"{spec} is a {type(factory).__name__}, not callable; point the spec at a function or class returning an nn.Module")
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001 - arbitrary user code
        raise QexportError(f"calling factory {spec}() failed: {type(e).__name__}: {e}; it must build the model with no arguments") from None
    if not isinstance(model, nn.Module):
        raise QexportError(f"factory {spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    pp = getattr(factory, "qexport_preprocess", None) or getattr(model, "qexport_preprocess", None)
    if pp is not None and not isinstance(pp, dict):
        raise QexportError(f"{spec}: qexport_preprocess must be a dict with input_size, mean, std, got {type(pp).__name__}")
    return model, Preprocess.from_dict(pp) if pp else None


def _pt2_preset(shape: tuple[int, ...] | None, mean, std) -> Preprocess:
    if shape is None or len(shape) != 4:
        return IMAGENET_PRESET
    c, h, w = (int(v) for v in shape[1:])
    if c not in (1, 3):
        raise QexportError(f"exported program expects {c} input channels; qexport handles 1 (grey) or 3 (RGB) channel images")
    if (c, h, w) == (3, 224, 224):
        return IMAGENET_PRESET
    if c == 3:
        return Preprocess((h, w), IMAGENET_MEAN, IMAGENET_STD, resize=None, channels=3)
    if mean is None or std is None:
        raise QexportError("exported program takes 1-channel input; pass --mean and --std for its normalisation")
    return Preprocess((h, w), tuple(mean), tuple(std), resize=None, channels=1)


def load_model(
    spec: str,
    weights: str | None = None,
    *,
    input_size: Sequence[int] | int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """Build or load a float model from a spec.

    Args:
        spec: ``cifar:resnet20`` (any registered ``family:name``), ``torchvision:<name>``,
            ``package.module:factory`` or a path to a ``torch.export`` program ending in ``.pt2``.
        weights: optional state dict (``torch.load`` with ``weights_only=True``) or ``.safetensors`` file.
        input_size: override the preset's (H, W) (an int means square).
        mean: override the per-channel mean.
        std: override the per-channel std.
        num_classes: classifier size for registered families (recorded as given for other specs).

    Returns:
        The LoadedModel (eval mode, float32, CPU).
    """
    spec = spec.strip()
    if not spec:
        raise QexportError(f"empty model spec; use one of the families {', '.join(families())}, package.module:factory or a .pt2 file")
    preset: Preprocess | None
    if spec.endswith(".pt2"):
        from qexport.models.pt2 import load_pt2

        model, shape = load_pt2(spec)
        preset = _pt2_preset(shape, mean, std)
        nc = num_classes
    elif ":" in spec and spec.split(":", 1)[0] in families():
        fam, _, name = spec.partition(":")
        model, preset, nc = get(fam).build(name, num_classes)
    elif ":" in spec:
        model, preset = _from_factory(spec)
        nc = num_classes
    else:
        hint = " (file not found)" if Path(spec).suffix else ""
        raise QexportError(
            f"unknown model spec {spec!r}{hint}; use family:name with a family in {', '.join(families())} "
            "(see list_models()), package.module:factory, or a .pt2 file"
        )
    if preset is None:
        preset = IMAGENET_PRESET
    preprocess = preset.with_overrides(input_size=input_size, mean=mean, std=std)
    digest = None
    if weights is not None:
        sd = read_state_dict(weights)
        apply_state_dict(model, sd, str(weights), spec)
        digest = sha256_file(weights)
    model = model.to(device="cpu", dtype=torch.float32).eval()
    if nc is None:
        nc = _last_linear_out(model)
    return LoadedModel(
        model=model,
        spec=spec,
        weights=str(weights) if weights is not None else None,
        weights_sha256=digest,
        preprocess=preprocess,
        num_classes=nc,
        input_shape=preprocess.input_shape,
    )
