"""Model families, timm style: ``@register_model("family")`` on a builder, ``list_models()``, ``get(family)``."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from qexport.errors import QexportError
from qexport.models.preprocess import Preprocess

# builder(name, num_classes) -> (module, preset, num_classes)
Builder = Callable[[str, "int | None"], "tuple[nn.Module, Preprocess, int | None]"]


@dataclass(frozen=True)
class ModelFamily:
    """A registered family of models addressed as ``family:name``.

    Args:
        name: the family prefix (``cifar``, ``torchvision``).
        build: ``build(name, num_classes) -> (nn.Module, Preprocess preset, num_classes)``; raises QexportError
            for an unknown name.
        names: returns the model names the family knows (for listing).
        description: one line for help texts.
        class_names: names of the classifier outputs of the family's default head (empty: unknown).
    """

    name: str
    build: Builder
    names: Callable[[], list[str]]
    description: str = ""
    class_names: tuple[str, ...] = ()


_FAMILIES: dict[str, ModelFamily] = {}


def register_model(family: str, names: Callable[[], list[str]] | list[str] | None = None, description: str = "",
                   class_names: tuple[str, ...] = ()):
    """Decorator registering a builder as model family ``family``.

    Args:
        family: prefix of the specs this builder answers (``family:name``).
        names: the names it knows, as a list or a callable returning one (called lazily).
        description: one line for help texts.
        class_names: the classes of its default head (e.g. CIFAR-10's), for image folders of synthetic samples.

    Returns:
        The decorator; it returns the builder unchanged.
    """

    def deco(fn: Builder) -> Builder:
        if callable(names):
            lister = names
        else:
            fixed = list(names or [])
            lister = lambda: list(fixed)  # noqa: E731
        _FAMILIES[family] = ModelFamily(family, fn, lister, description or (fn.__doc__ or "").strip().split("\n")[0],
                                        tuple(class_names))
        return fn

    return deco


def families() -> list[str]:
    """Names of the registered families.

    Returns:
        Sorted family names.
    """
    return sorted(_FAMILIES)


def get(family: str) -> ModelFamily:
    """Look up a registered family.

    Args:
        family: its prefix.

    Returns:
        The ModelFamily.
    """
    try:
        return _FAMILIES[family]
    except KeyError:
        raise QexportError(f"unknown model family {family!r}; known families: {', '.join(families())}") from None


def list_models(pattern: str | None = None) -> list[str]:
    """All registered model specs (``family:name``), optionally filtered by a glob pattern.

    Args:
        pattern: fnmatch pattern such as ``cifar:*``; None lists everything.

    Returns:
        Sorted specs.
    """
    out = [f"{fam}:{n}" for fam in families() for n in _FAMILIES[fam].names()]
    if pattern:
        out = [s for s in out if fnmatch.fnmatch(s, pattern)]
    return sorted(out)


def class_names(spec: str, num_classes: int) -> list[str]:
    """Names of a model's classes: its family's when it has ``num_classes`` of them, else ``class_0 ...``.

    Args:
        spec: the model spec (``cifar:resnet20``).
        num_classes: classifier outputs.

    Returns:
        One name per class.
    """
    fam = _FAMILIES.get(str(spec).partition(":")[0])
    if fam is not None and len(fam.class_names) == num_classes:
        return list(fam.class_names)
    width = len(str(num_classes - 1))
    return [f"class_{i:0{width}d}" for i in range(num_classes)]
