"""Locate the optional shared folder (pretrained CIFAR ResNets, CIFAR-10 images) for tests and benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path | None:
    """The shared folder: ``$QEXPORT_SHARED`` if set, else ``../shared`` beside the repository.

    Returns:
        The folder, or None when it does not exist.
    """
    env = os.environ.get("QEXPORT_SHARED")
    cand = Path(env) if env else _REPO_ROOT.parent / "shared"
    return cand if cand.is_dir() else None


def cifar_checkpoint(depth: int) -> Path | None:
    """Path of the pretrained CIFAR-10 ResNet checkpoint of that depth in the shared folder, if present."""
    root = shared_dir()
    if root is None:
        return None
    hits = sorted((root / "models" / "cifar10").glob(f"resnet{depth}-*.th"))
    return hits[0] if hits else None


def cifar_images(split: str) -> Path | None:
    """Folder of CIFAR-10 JPEGs (``train`` or ``test-dev``) in the shared folder, if present."""
    root = shared_dir()
    if root is None:
        return None
    p = root / "data" / "cifar10" / split
    return p if p.is_dir() else None
