"""Writing tensors (e.g. synthetic calibration sets) back to disk as an image folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from qexport.errors import QexportError
from qexport.fileio import atomic_dir
from qexport.models.preprocess import Preprocess


def save_image_folder(
    x: torch.Tensor,
    labels: torch.Tensor | Sequence[int] | None,
    classes: Sequence[str] | None,
    preprocess: Preprocess,
    out_dir: str | os.PathLike,
    force: bool = False,
) -> Path:
    """De-normalise images, clamp to [0, 1] and write 8-bit PNGs, atomically.

    Labelled images go to ``out_dir/<class>/NNNNNN.png``; with no labels/classes (or label -1) they go flat
    into ``out_dir``. PNG rounding to 8 bits is the only loss: reloading with the same (no-resize)
    preprocessing gives the tensors back within half a grey level / std.

    Args:
        x: float [N, C, H, W], normalised with ``preprocess``.
        labels: class index per image, or None.
        classes: class names (folder names), or None.
        preprocess: the normalisation to undo.
        out_dir: the folder to create.
        force: replace an existing folder.

    Returns:
        The folder.
    """
    from PIL import Image

    if x.dim() != 4 or x.shape[1] != preprocess.channels:
        raise QexportError(f"expected images as [N, {preprocess.channels}, H, W], got {tuple(x.shape)}")
    n = x.shape[0]
    labs = [-1] * n if labels is None else [int(v) for v in (labels.tolist() if torch.is_tensor(labels) else labels)]
    if len(labs) != n:
        raise QexportError(f"{n} images but {len(labs)} labels")
    classes = list(classes or [])
    if any(lab >= 0 for lab in labs) and not classes:
        classes = [str(i) for i in range(max(labs) + 1)]
    if any(lab >= len(classes) for lab in labs):
        raise QexportError(f"label {max(labs)} out of range for {len(classes)} classes")
    mean = torch.tensor(preprocess.mean).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std).view(1, -1, 1, 1)
    pix = ((x.detach().float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    arr = pix.permute(0, 2, 3, 1).numpy()
    with atomic_dir(out_dir, force) as tmp:
        for c in classes:
            (tmp / c).mkdir()
        for i in range(n):
            folder = tmp / classes[labs[i]] if labs[i] >= 0 else tmp
            img = arr[i][:, :, 0] if preprocess.channels == 1 else arr[i]
            Image.fromarray(np.ascontiguousarray(img), mode=None).save(folder / f"{i:06d}.png")
    return Path(out_dir)
