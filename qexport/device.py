"""Where a run computes, and where its checkpoints live (used by every command that trains or calibrates)."""

from __future__ import annotations

from pathlib import Path

import torch

from qexport.errors import QexportError


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is available, else ``cpu``; validates explicit choices."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QexportError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise QexportError(f"--device {device!r} is not understood; use auto, cpu or cuda")
    return device


def work_dir_for(output: Path) -> Path:
    """Persistent checkpoint folder of a run writing ``output`` (kept on interrupt, removed on success)."""
    return output.with_name(f".{output.name}.work")
