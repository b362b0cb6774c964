"""DigitsNet: a small CNN trained on scikit-learn's bundled 8x8 handwritten digits (upsampled to 16x16).

A real, honest end-to-end demo for machines without the shared CIFAR folder: ``prepare_digits()`` writes the
digits as PNG image folders, trains the net on CPU in seconds and saves safetensors weights; the model spec is
``qexport.zoo.digits:digits_net``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from qexport.errors import MissingDependencyError, QexportError

CACHE_VERSION = "digits-v1"
PREPROCESS = {"input_size": (16, 16), "mean": (0.5,), "std": (0.5,), "channels": 1}
MIN_ACCURACY = 0.95


class BasicBlock(nn.Module):
    """Residual block: conv-BN-ReLU-conv-BN, identity shortcut, ReLU."""

    def __init__(self, planes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class DigitsNet(nn.Module):
    """1x16x16 -> 10 classes: conv 1->16, conv 16->32 stride 2, a residual block, global pool, linear."""

    qexport_preprocess = PREPROCESS

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.block = BasicBlock(32)
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.block(x)
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def digits_net() -> DigitsNet:
    """Factory for the model spec ``qexport.zoo.digits:digits_net`` (random weights; pass --weights).

    Returns:
        A new DigitsNet.
    """
    return DigitsNet()


digits_net.qexport_preprocess = PREPROCESS  # type: ignore[attr-defined]


def default_cache_dir() -> Path:
    """``$QEXPORT_CACHE`` or ``~/.cache/qexport``.

    Returns:
        The folder (not created).
    """
    env = os.environ.get("QEXPORT_CACHE")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qexport"


def _digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise MissingDependencyError(
            "the digits demo needs scikit-learn (it ships the digits data); install it with pip install 'qexport[demo]'"
        ) from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N,1,8,8] in [0,1]
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(d.target, dtype=torch.long)


def _write_split(x: torch.Tensor, y: torch.Tensor, out: Path) -> None:
    from PIL import Image

    pix = (x * 255).round().to(torch.uint8)[:, 0].numpy()
    for c in range(10):
        (out / str(c)).mkdir(parents=True)
    for i in range(len(y)):
        Image.fromarray(pix[i]).save(out / str(int(y[i])) / f"{i:04d}.png")


def _train(x: torch.Tensor, y: torch.Tensor, epochs: int = 6, seed: int = 0) -> DigitsNet:
    # tiny tensors: one thread is fastest, and immune to the OpenMP slow-down of a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_loop(x, y, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train_loop(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> DigitsNet:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitsNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(y) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for s in range(0, len(y), 64):
            idx = perm[s : s + 64]
            xb = x[idx]
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()  # tiny translation augmentation
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def prepare_digits(cache_dir: str | os.PathLike | None = None, force: bool = False) -> dict[str, object]:
    """Write the digits image folders and train DigitsNet once; later calls return the cached result.

    Deterministic: an 80/20 split with seed 0 (1438 train / 359 test images, 16x16 grey PNGs in class
    subfolders ``0``..``9``), training seeded too. Takes a few seconds on 2 CPU cores.

    Args:
        cache_dir: parent folder of the cache (default :func:`default_cache_dir`).
        force: rebuild even if cached.

    Returns:
        ``{"weights": path to safetensors, "train": folder, "test": folder, "accuracy": test top-1,
        "spec": "qexport.zoo.digits:digits_net"}``.
    """
    from safetensors.torch import save_file

    from qexport.data import load_tensor
    from qexport.fileio import atomic_dir
    from qexport.models.preprocess import Preprocess

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / CACHE_VERSION
    meta_path = out / "meta.json"
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        return _result(out, meta)
    x, y = _digit_images()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train = int(round(0.8 * len(y)))
    tr, te = perm[:n_train].sort().values, perm[n_train:].sort().values
    pp = Preprocess.from_dict(PREPROCESS)
    t0 = time.time()
    with atomic_dir(out, force=True) as tmp:
        _write_split(x[tr], y[tr], tmp / "train")
        _write_split(x[te], y[te], tmp / "test")
        # train and evaluate on the PNGs exactly as qexport will read them
        xtr, ytr = load_tensor(tmp / "train", pp)
        xte, yte = load_tensor(tmp / "test", pp)
        model = _train(xtr, ytr)
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        if acc < MIN_ACCURACY:
            raise QexportError(f"digits demo reached only {acc:.1%} test accuracy (< {MIN_ACCURACY:.0%}); this is a bug, please report it")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "weights.safetensors"))
        meta = {"accuracy": acc, "train_images": len(ytr), "test_images": len(yte), "seconds": round(time.time() - t0, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return _result(out, meta)


def _result(out: Path, meta: dict) -> dict[str, object]:
    return {
        "weights": str(out / "weights.safetensors"),
        "train": str(out / "train"),
        "test": str(out / "test"),
        "accuracy": float(meta["accuracy"]),
        "spec": "qexport.zoo.digits:digits_net",
    }
