"""Labelled training images for quantization-aware training: checks, a held-out split, seeded augmentation.

The training folder (class subfolders) is split once, by a seeded permutation, into a training part and a
held-out part (``val_fraction``, default 0.1) that the trainer scores for its progress bar and, if asked, to
choose the final epoch. Evaluation images (test-dev) are never read here.

Augmentation follows the model family:

* inputs whose preprocessing has no resize (CIFAR, 32x32): every image is decoded once into memory; each batch
  gets a random crop from the image padded by 4 black pixels and a horizontal flip (torchvision's
  RandomCrop(padding=4) + RandomHorizontalFlip, applied to the normalised tensors);
* inputs with a resize (ImageNet family, 224): each image is decoded per use, given a random resized crop
  (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip, then normalised; held-out images get the usual
  resize + center crop.

All randomness comes from generators seeded by (seed, epoch), so a run repeats exactly and a resumed run
continues with the same batches.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qexport.data.folder import ImageFolder, load_tensor
from qexport.errors import QexportError
from qexport.models.preprocess import Preprocess


@dataclass
class LabelledSplit:
    """A labelled folder split into training and held-out indices.

    Attributes:
        folder: the ImageFolder.
        train_idx: training image indices (folder order, before shuffling).
        val_idx: held-out image indices.
        in_memory: (images, labels) of the whole folder when the images are decoded once (no-resize models).
    """

    folder: ImageFolder
    train_idx: list[int]
    val_idx: list[int]
    in_memory: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.folder.classes)


def open_labelled(root: str | Path, preprocess: Preprocess, num_classes: int | None, val_fraction: float,
                  seed: int, max_images: int | None = None, progress=None) -> LabelledSplit:
    """Open a labelled training folder, check it against the model, and split it.

    Args:
        root: folder with one subfolder per class.
        preprocess: the model's preprocessing.
        num_classes: the model's number of outputs (None: not checked).
        val_fraction: held-out share in [0, 0.5).
        seed: seed of the split (and of the ``max_images`` subset).
        max_images: use a seeded subset of this many images (None: all).
        progress: ``progress(done, total)`` while decoding into memory.

    Returns:
        The LabelledSplit.
    """
    if not 0.0 <= val_fraction < 0.5:
        raise QexportError(f"--val-fraction must be in [0, 0.5), got {val_fraction}")
    folder = ImageFolder(root, preprocess)
    check_labelled(folder, num_classes)
    idx = list(range(len(folder)))
    if max_images is not None and max_images < len(idx):
        idx = sorted(torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:max_images].tolist())
    perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    n_val = int(round(val_fraction * len(idx)))
    if len(idx) - n_val < 1:
        raise QexportError(f"{root} holds too few images ({len(idx)}) to train on")
    val = sorted(idx[i] for i in perm[:n_val])
    train = sorted(idx[i] for i in perm[n_val:])
    folder.validate(seed=seed)
    mem = None
    if preprocess.resize is None:
        key = (str(Path(root).resolve()), folder.fingerprint(), repr(preprocess))
        if key not in _DECODED:  # one decode per process (benches train several methods on one folder)
            _DECODED.clear()
            _DECODED[key] = load_tensor(folder, batch_size=256, progress=progress)
        mem = _DECODED[key]
    return LabelledSplit(folder, train, val, mem)


_DECODED: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def check_labelled(folder: ImageFolder, num_classes: int | None) -> None:
    """Refuse a flat folder, or one whose class folders do not match the model's outputs.

    Args:
        folder: the training folder.
        num_classes: the model's number of outputs (None: not checked).
    """
    if not folder.labelled:
        raise QexportError(f"{folder.root} is a flat folder (no class subfolders): quantization-aware training "
                           "needs labelled images, one subfolder per class")
    if num_classes is not None and len(folder.classes) != num_classes:
        raise QexportError(f"{folder.root} has {len(folder.classes)} class folders but the model has {num_classes} "
                           "outputs; pass a training folder with exactly the model's classes")


def _black(preprocess: Preprocess) -> torch.Tensor:
    mean = torch.tensor(preprocess.mean).view(-1, 1, 1)
    std = torch.tensor(preprocess.std).view(-1, 1, 1)
    return (0.0 - mean) / std


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int, fill: torch.Tensor) -> torch.Tensor:
    """Random crop of the image padded by ``pad`` pixels of ``fill``, then a random horizontal flip, per image.

    Args:
        x: normalised images (B, C, H, W).
        gen: seeded generator.
        pad: padding in pixels.
        fill: per-channel padding value (C, 1, 1) in normalised units.

    Returns:
        The augmented batch (a new tensor).
    """
    b, c, h, w = x.shape
    padded = fill.to(x.dtype).expand(c, h + 2 * pad, w + 2 * pad).repeat(b, 1, 1, 1)
    padded[:, :, pad : pad + h, pad : pad + w] = x
    offs = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen).tolist()
    flips = (torch.rand(b, generator=gen) < 0.5).tolist()
    out = torch.empty_like(x)
    for i, ((dy, dx), f) in enumerate(zip(offs, flips)):
        img = padded[i, :, dy : dy + h, dx : dx + w]
        out[i] = img.flip(-1) if f else img
    return out


def random_resized_crop_flip(img, size: tuple[int, int], rng: random.Random):
    """Random resized crop (area 8-100 %, aspect 3/4-4/3, center crop fallback) and a random flip of a PIL image.

    Args:
        img: PIL image.
        size: output (H, W).
        rng: seeded random source.

    Returns:
        The augmented PIL image of ``size``.
    """
    import torchvision.transforms.functional as TF

    width, height = img.size
    area = width * height
    box = None
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            box = (rng.randint(0, height - h), rng.randint(0, width - w), h, w)
            break
    if box is None:
        s = min(width, height)
        box = ((height - s) // 2, (width - s) // 2, s, s)
    out = TF.resized_crop(img, *box, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.hflip(out) if rng.random() < 0.5 else out


def _load_augmented(folder: ImageFolder, i: int, rng: random.Random) -> torch.Tensor:
    from PIL import Image

    pre = folder.preprocess
    with Image.open(folder.paths[i]) as img:
        img = img.convert("L" if pre.channels == 1 else "RGB")
        img = random_resized_crop_flip(img, pre.input_size, rng)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    mean = torch.tensor(pre.mean).view(-1, 1, 1)
    std = torch.tensor(pre.std).view(-1, 1, 1)
    return (t - mean) / std


def epoch_order(split: LabelledSplit, epoch: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """The training indices of one epoch: a seeded shuffle, then this rank's share (DistributedSampler's rule:
    padded to a multiple of ``world`` by repeating the first indices, then every ``world``-th from ``rank``).

    Args:
        split: the split.
        epoch: epoch number (the shuffle changes every epoch).
        seed: the run's seed.
        rank: this process's rank.
        world: number of processes.

    Returns:
        Indices into the folder.
    """
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    order = [split.train_idx[i] for i in torch.randperm(len(split.train_idx), generator=g).tolist()]
    if world > 1:
        total = math.ceil(len(order) / world) * world
        order = (order + order[: total - len(order)])[rank:total:world]
    return order


def train_batch(split: LabelledSplit, indices: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An augmented training batch.

    Args:
        split: the split.
        indices: folder indices of the batch.
        gen: the epoch's seeded generator (also seeds the PIL path).

    Returns:
        (images, labels).
    """
    labels = torch.tensor([split.folder.labels[i] for i in indices], dtype=torch.long)
    if split.in_memory is not None:
        x = split.in_memory[0][indices]
        return crop_flip(x, gen, 4, _black(split.folder.preprocess)), labels
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=gen)))
    return torch.stack([_load_augmented(split.folder, i, rng) for i in indices]), labels


def val_batches(split: LabelledSplit, batch_size: int):
    """Held-out batches without augmentation (the model's own preprocessing).

    Args:
        split: the split.
        batch_size: images per batch.

    Returns:
        A generator of (images, labels).
    """
    for s in range(0, len(split.val_idx), batch_size):
        idx = split.val_idx[s : s + batch_size]
        labels = torch.tensor([split.folder.labels[i] for i in idx], dtype=torch.long)
        if split.in_memory is not None:
            yield split.in_memory[0][idx], labels
        else:
            yield torch.stack([split.folder.load(i) for i in idx]), labels
