"""Seeded corrupted copies of an image folder: a shifted evaluation set anyone can regenerate.

Five corruptions at five fixed severities each (parameters in :data:`CORRUPTIONS`, for pixel values in [0, 1]),
in the spirit of CIFAR-10-C: Gaussian noise, Gaussian blur, contrast loss, brightness shift, JPEG compression.
Every output image is a PNG (lossless, so the corruption is exactly what was written), at
``OUT/<corruption>-<severity>/<class>/<name>.png``; each of those folders is an ordinary labelled image folder
that ``verify --data`` reads. ``OUT/corruptions.json`` says how the set was made (source folder and its
fingerprint, seed, corruptions, severities and their parameters, qexport version). Random draws (the noise) come
from a generator seeded by (seed, corruption, severity, image index), so any subset of corruptions or severities
reproduces the same images.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qexport.errors import QexportError

SEVERITIES = (1, 2, 3, 4, 5)
DEFAULT_SEVERITIES = (3,)
CORRUPTION_SET_VERSION = 1


def _noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return img + rng.normal(0.0, sigma, img.shape)


def _blur(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:  # noqa: ARG001
    radius = max(1, int(np.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    out = img
    for axis in (0, 1):  # separable, edges reflected
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        p = np.pad(out, pad, mode="reflect")
        out = sum(k[i] * np.take(p, np.arange(i, i + img.shape[axis]), axis=axis) for i in range(len(k)))
    return out


def _contrast(img: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:  # noqa: ARG001
    mean = img.mean(axis=(0, 1), keepdims=True)
    return (img - mean) * factor + mean


def _brightness(img: np.ndarray, delta: float, rng: np.random.Generator) -> np.ndarray:  # noqa: ARG001
    return img + delta


def _jpeg(img: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:  # noqa: ARG001
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_to_uint8(img)).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as dec:
        return np.asarray(dec.convert("RGB"), dtype=np.float64) / 255.0


@dataclass(frozen=True)
class Corruption:
    """One corruption: its function ``(image HxWx3 in [0,1], parameter, rng) -> image`` and one parameter per
    severity 1..5."""

    name: str
    fn: Callable
    params: tuple[float, ...]
    meaning: str = field(default="")


CORRUPTIONS: dict[str, Corruption] = {c.name: c for c in (
    Corruption("gaussian_noise", _noise, (0.04, 0.06, 0.08, 0.10, 0.13), "standard deviation added to [0,1] pixels"),
    Corruption("gaussian_blur", _blur, (0.5, 0.75, 1.0, 1.25, 1.5), "blur standard deviation in pixels"),
    Corruption("contrast", _contrast, (0.75, 0.5, 0.4, 0.3, 0.2), "factor applied around the image mean"),
    Corruption("brightness", _brightness, (0.1, 0.2, 0.3, 0.4, 0.5), "value added to [0,1] pixels"),
    Corruption("jpeg", _jpeg, (80, 60, 40, 25, 15), "JPEG quality of a re-encoding"),
)}


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def corrupt_image(img: np.ndarray, name: str, severity: int, seed: int, index: int) -> np.ndarray:
    """Apply one corruption to one uint8 RGB image, deterministically.

    Args:
        img: HxWx3 uint8.
        name: corruption name (a key of :data:`CORRUPTIONS`).
        severity: 1..5.
        seed: the set's seed.
        index: the image's position in the source folder (seeds its random draws).

    Returns:
        The corrupted HxWx3 uint8 image.
    """
    c = CORRUPTIONS[name]
    rng = np.random.default_rng([seed, list(CORRUPTIONS).index(name), severity, index])
    return _to_uint8(c.fn(img.astype(np.float64) / 255.0, float(c.params[severity - 1]), rng))


@dataclass(frozen=True)
class CorruptConfig:
    """What ``qexport corrupt`` writes.

    Args:
        corruptions: names (default all five).
        severities: 1..5 (default 3).
        seed: seed of the random draws.
        num_samples: seeded subset of the source images (None: all).
    """

    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)
    severities: tuple[int, ...] = DEFAULT_SEVERITIES
    seed: int = 0
    num_samples: int | None = None

    def __post_init__(self) -> None:
        bad = [c for c in self.corruptions if c not in CORRUPTIONS]
        if bad or not self.corruptions:
            raise QexportError(f"unknown corruption(s) {', '.join(bad) or '(none given)'}; choose from "
                               f"{', '.join(CORRUPTIONS)}")
        if not self.severities or any(s not in SEVERITIES for s in self.severities):
            raise QexportError(f"severities must be among 1..5, got {list(self.severities)}")
        if self.num_samples is not None and self.num_samples <= 0:
            raise QexportError(f"--num-samples must be positive, got {self.num_samples}")


def describe(cfg: CorruptConfig) -> list[dict]:
    """The JSON description of each (corruption, severity) folder."""
    return [{"folder": f"{c}-{s}", "corruption": c, "severity": s, "parameter": CORRUPTIONS[c].params[s - 1],
             "parameter_meaning": CORRUPTIONS[c].meaning} for c in cfg.corruptions for s in cfg.severities]


def write_corrupted(src: str | Path, out: str | Path, cfg: CorruptConfig, *, force: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the corrupted copies of a labelled image folder (atomically) and ``corruptions.json``.

    Args:
        src: source image folder (class subfolders).
        out: destination folder.
        cfg: what to write.
        force: replace an existing destination.
        progress: called with (done, total) images written.

    Returns:
        The destination folder.
    """
    from PIL import Image

    from qexport import __version__
    from qexport.data.folder import ImageFolder, subset_indices
    from qexport.fileio import atomic_dir
    from qexport.models.preprocess import Preprocess

    folder = ImageFolder(src, Preprocess((1, 1), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))  # listing only: images are read here directly
    if not folder.labelled:
        raise QexportError(f"{src} has no class subfolders; corrupted copies keep the labels, so pass a labelled folder")
    indices = subset_indices(len(folder), cfg.num_samples, cfg.seed)
    total, done = len(indices) * len(cfg.corruptions) * len(cfg.severities), 0
    with atomic_dir(out, force=force) as tmp:
        for i in indices:
            path = folder.paths[i]
            try:
                with Image.open(path) as im:
                    img = np.asarray(im.convert("RGB"))
            except OSError as e:
                raise QexportError(f"cannot read image {path} ({e}); remove or replace the file") from None
            rel = path.relative_to(folder.root).with_suffix(".png")
            for entry in describe(cfg):
                dst = tmp / entry["folder"] / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(corrupt_image(img, entry["corruption"], entry["severity"], cfg.seed, i)).save(dst)
                done += 1
            if progress is not None:
                progress(done, total)
        meta = {"format": "qexport-corruptions", "version": CORRUPTION_SET_VERSION, "source": str(src),
                "source_fingerprint": folder.fingerprint(), "seed": cfg.seed, "num_samples": cfg.num_samples,
                "images": len(indices), "folders": describe(cfg), "qexport_version": __version__}
        (tmp / "corruptions.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def corrupted_folders(root: str | Path) -> list[Path]:
    """The image folders of a corrupted set, in the order of its ``corruptions.json``.

    Args:
        root: a folder written by :func:`write_corrupted`.

    Returns:
        Folder paths.
    """
    meta_path = Path(root) / "corruptions.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise QexportError(f"{meta_path} is missing or unreadable ({e}); write the set with `qexport corrupt`") from None
    return [Path(root) / f["folder"] for f in meta["folders"]]


def expand_data_folders(paths) -> list[Path]:
    """``--data`` folders with every corrupted set (a folder holding ``corruptions.json``) replaced by its folders.

    Args:
        paths: folders as given.

    Returns:
        Image folders, in order.
    """
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        out += corrupted_folders(p) if (p / "corruptions.json").is_file() else [p]
    return out
