"""Image folders: class subfolders give labels (sorted names = class order); a flat folder is unlabeled."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from qexport.errors import QexportError
from qexport.models.preprocess import Preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def preprocess_image(img, preprocess: Preprocess, name: str = "image") -> torch.Tensor:
    """Turn a PIL image into a normalised (C, H, W) float tensor.

    Args:
        img: a PIL image (any mode).
        preprocess: resize/crop/normalisation settings.
        name: the image's name for error messages.

    Returns:
        The float32 tensor.
    """
    import torchvision.transforms.functional as TF

    img = img.convert("L" if preprocess.channels == 1 else "RGB")
    h, w = preprocess.input_size
    if preprocess.resize is not None:
        img = TF.resize(img, preprocess.resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        img = TF.center_crop(img, [h, w])
    elif (img.height, img.width) != (h, w):
        raise QexportError(
            f"image {name} is {img.width}x{img.height} (WxH) but the model takes {w}x{h} and its preprocessing has no "
            f"resize; pass --input-size {img.height},{img.width} if the model accepts it, or use a preset with a resize"
        )
    arr = np.asarray(img, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr.copy())
    t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
    mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32).view(-1, 1, 1)
    return (t - mean) / std


class ImageFolder(Dataset):
    """Images under ``root``, labelled by class subfolder, or unlabeled (label -1) when ``root`` is flat.

    With class subfolders, images lying directly in ``root`` are ignored; subfolders are not searched
    recursively. Images are opened lazily; a bad one raises QexportError naming it when it is loaded.

    Args:
        root: the folder.
        preprocess: how each image becomes a tensor.

    Attributes:
        classes: sorted class folder names ([] for a flat folder).
        paths: image paths, in class then file-name order.
        labels: class index per image (-1 when unlabeled).
    """

    def __init__(self, root: str | os.PathLike, preprocess: Preprocess):
        self.root = Path(root)
        self.preprocess = preprocess
        if not self.root.exists():
            raise QexportError(f"image folder {self.root} not found; check the --data path")
        if not self.root.is_dir():
            raise QexportError(f"{self.root} is not a folder; pass a folder of images (one subfolder per class, or flat)")
        subdirs = sorted(d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        paths: list[Path] = []
        labels: list[int] = []
        classes: list[str] = []
        # every subfolder is a class once any of them holds images: an empty class keeps its index
        class_dirs = subdirs if any(_is_image(f) for d in subdirs for f in d.iterdir()) else []
        flat = sorted(f for f in self.root.iterdir() if _is_image(f))
        if class_dirs:
            classes = [d.name for d in class_dirs]
            for i, d in enumerate(class_dirs):
                files = sorted(f for f in d.iterdir() if _is_image(f))
                paths += files
                labels += [i] * len(files)
        elif flat:
            paths, labels = flat, [-1] * len(flat)
        if not paths:
            raise QexportError(
                f"no images in {self.root} (accepted extensions: {', '.join(e[1:] for e in IMAGE_EXTENSIONS)}); "
                "use class subfolders of images or a flat folder of images"
            )
        self.classes: list[str] = classes
        self.paths: list[Path] = paths
        self.labels: list[int] = labels

    @property
    def labelled(self) -> bool:
        """True when the folder has class subfolders."""
        return bool(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        """Open and preprocess one image.

        Args:
            index: position in :attr:`paths`.

        Returns:
            The (C, H, W) tensor; raises QexportError naming the file if it cannot be read.
        """
        from PIL import Image, UnidentifiedImageError

        p = self.paths[index]
        try:
            with Image.open(p) as img:
                img.load()
                return preprocess_image(img, self.preprocess, str(p))
        except QexportError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise QexportError(f"cannot read image {p} ({type(e).__name__}: {str(e)[:100]}); remove or replace the file") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index), self.labels[index]

    def validate(self, sample_count: int = 8, seed: int = 0) -> None:
        """Open a few images up front (the first one and a seeded sample) so bad data fails early.

        Args:
            sample_count: how many images to open.
            seed: seed of the sample.

        Returns:
            None; raises QexportError on the first bad image.
        """
        n = len(self)
        g = torch.Generator().manual_seed(seed)
        idx = [0] + torch.randperm(n, generator=g)[: max(0, sample_count - 1)].tolist()
        for i in dict.fromkeys(idx):
            self.load(i)

    def fingerprint(self) -> str:
        """:func:`fingerprint` of this folder's images relative to its root.

        Returns:
            Hex digest.
        """
        return fingerprint(self.paths, self.root)


def fingerprint(paths: Sequence[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """A cheap data fingerprint: SHA-256 over the sorted relative paths and file sizes.

    Args:
        paths: image files.
        root: paths are taken relative to it (default: their common folder).

    Returns:
        Hex digest.
    """
    ps = [Path(p) for p in paths]
    if root is None:
        root = Path(os.path.commonpath([str(p.parent) for p in ps])) if ps else Path(".")
    h = hashlib.sha256()
    for rel, size in sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in ps):
        h.update(f"{rel}\t{size}\n".encode())
    return h.hexdigest()


def _collate(batch):
    xs, ys = zip(*batch)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def subset_indices(n: int, num_samples: int | None, seed: int = 0) -> list[int]:
    """The deterministic subset :func:`load_tensor` uses.

    Args:
        n: dataset size.
        num_samples: how many (None or >= n: all, in folder order).
        seed: permutation seed.

    Returns:
        Indices.
    """
    if num_samples is None or num_samples >= n:
        return list(range(n))
    if num_samples <= 0:
        raise QexportError(f"number of samples must be positive, got {num_samples}")
    return _permutation(n, seed)[:num_samples]


def heldout_indices(n: int, num_samples: int, count: int, seed: int = 0) -> list[int]:
    """Up to ``count`` indices that :func:`subset_indices` leaves out: the next ones of the same seeded permutation.

    Args:
        n: dataset size.
        num_samples: size of the subset they stay outside.
        count: how many wanted.
        seed: permutation seed (the subset's).

    Returns:
        Indices, fewer than ``count`` when the folder is too small (none when the subset takes it all).
    """
    if num_samples >= n:
        return []
    return _permutation(n, seed)[num_samples : num_samples + count]


def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def load_tensor(
    root: str | os.PathLike | ImageFolder,
    preprocess: Preprocess | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a seeded random subset of an image folder into memory.

    Args:
        root: the folder (or an ImageFolder, then ``preprocess`` may be None).
        preprocess: how images become tensors.
        num_samples: how many images (a seeded permutation); None, or more than the folder holds, loads all
            of them in folder order.
        seed: permutation seed (``torch.Generator().manual_seed(seed)``).
        batch_size: DataLoader batch size (num_workers=0).
        progress: called as ``progress(done, total)`` after each batch.

    Returns:
        (x: float32 [N, C, H, W], labels: int64 [N], -1 for unlabeled images).
    """
    ds = root if isinstance(root, ImageFolder) else ImageFolder(root, preprocess)
    idx = subset_indices(len(ds), num_samples, seed)
    loader = DataLoader(Subset(ds, idx), batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=_collate)
    xs, ys, done = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        done += len(y)
        if progress is not None:
            progress(done, len(idx))
    return torch.cat(xs), torch.cat(ys)


def iter_batches(
    dataset: Dataset, batch_size: int, indices: Sequence[int] | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield stacked batches from a dataset of (tensor, label) pairs.

    Args:
        dataset: e.g. an ImageFolder.
        batch_size: images per batch.
        indices: which items, in order (default: all).

    Returns:
        A generator of (x [B, C, H, W], y [B]).
    """
    if batch_size <= 0:
        raise QexportError(f"batch size must be positive, got {batch_size}")
    order = list(range(len(dataset))) if indices is None else list(indices)
    for start in range(0, len(order), batch_size):
        yield _collate([dataset[i] for i in order[start : start + batch_size]])
