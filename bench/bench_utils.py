"""Helpers shared by the benchmark scripts beside this file (run as ``python bench/<script>.py``)."""

from __future__ import annotations

import torch


def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 500,
            device: str | torch.device | None = None) -> torch.Tensor:
    """Top-1 class of ``model`` (put in eval mode) for each image of ``x``.

    Args:
        model: any classifier returning logits.
        x: images (N, C, H, W) on the CPU.
        batch_size: images per forward.
        device: where the model runs (None: leave the batches on the CPU).

    Returns:
        int64 tensor (N,) on the CPU.
    """
    model.eval()
    with torch.no_grad():
        return torch.cat([model(xb if device is None else xb.to(device)).argmax(1).cpu()
                          for xb in x.split(batch_size)])


def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
         device: str | torch.device | None = None) -> float:
    """Top-1 accuracy in percent of ``model`` (put in eval mode) on images ``x`` with labels ``y``.

    Args:
        model: any classifier returning logits.
        x: images (N, C, H, W) on the CPU.
        y: int labels (N,) on the CPU.
        batch_size: images per forward.
        device: where the model runs (None: leave the batches on the CPU).

    Returns:
        Percent of images whose argmax is the label.
    """
    return 100.0 * int((predict(model, x, batch_size, device) == y).sum()) / len(x)


def cpu_seconds() -> float:
    """CPU time this process has used (user + system): what a run costs on an idle machine, whatever the load.

    Returns:
        Seconds.
    """
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def method_options(config_cls: type, pairs: list[str], owner: str) -> dict:
    """``--opt key=value`` texts parsed by the method config's field types (as the CLI parses them).

    Args:
        config_cls: the method's config dataclass.
        pairs: ``key=value`` strings.
        owner: who takes them, for messages.

    Returns:
        Option name -> typed value, for ``CalibrateConfig.options`` or the config itself
        (``qexport.options.typed_values``).
    """
    from qexport.options import typed_values

    return typed_values(config_cls, dict(p.split("=", 1) for p in pairs), owner)


def heldout_split(depth: int, num_samples: int, seed: int, eval_samples: int):
    """A CIFAR ResNet with its calibration subset and held-out *training* images (the subset's complement).

    Args:
        depth: ResNet depth (20, 32, ...).
        num_samples: calibration images (the seeded subset calibrate takes).
        seed: the subset's seed.
        eval_samples: held-out images drawn (fixed seed) from the rest of the training folder.

    Returns:
        ``(loaded model, calibration images, held-out images, their labels)``, or None without ../shared.
    """
    from qexport.data import ImageFolder, load_tensor
    from qexport.data.folder import subset_indices
    from qexport.models import load_model
    from qexport.shared import cifar_checkpoint, cifar_images

    ckpt, train = cifar_checkpoint(depth), cifar_images("train")
    if ckpt is None or train is None:
        print("shared folder with the checkpoint and training images not found (QEXPORT_SHARED); nothing to measure")
        return None
    m = load_model(f"cifar:resnet{depth}", str(ckpt))
    folder = ImageFolder(train, m.preprocess)
    calib_idx = set(subset_indices(len(folder), num_samples, seed))
    x_cal, _ = load_tensor(folder, num_samples=num_samples, seed=seed)
    rest = [i for i in range(len(folder)) if i not in calib_idx]
    pick = torch.randperm(len(rest), generator=torch.Generator().manual_seed(12345))[:eval_samples]
    xs, ys = zip(*(folder[rest[int(i)]] for i in pick))
    return m, x_cal, torch.stack(xs), torch.tensor(ys)
