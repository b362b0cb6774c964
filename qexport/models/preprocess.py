"""Preprocessing presets: how an image becomes the model's input tensor."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

from qexport.errors import QexportError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing for one model.

    Args:
        input_size: model input (H, W); images are center-cropped to it.
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by after the mean.
        resize: shorter side is resized to this before the center crop; None means no resize, and every
            image must already have exactly ``input_size``.
        channels: 3 (RGB) or 1 (greyscale).
    """

    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None
    channels: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.input_size) != 2 or min(self.input_size) <= 0:
            raise QexportError(f"input size must be two positive integers H,W, got {self.input_size}")
        if self.channels not in (1, 3):
            raise QexportError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise QexportError(
                f"mean and std need {self.channels} values (one per channel), got mean={self.mean} std={self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise QexportError(f"std values must be positive, got {self.std}")
        if self.resize is not None and int(self.resize) <= 0:
            raise QexportError(f"resize must be a positive integer or None, got {self.resize}")
        if self.resize is not None:
            object.__setattr__(self, "resize", int(self.resize))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The model input shape (C, H, W)."""
        return (self.channels, *self.input_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict.

        Returns:
            A dict with lists in place of tuples.
        """
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        """Inverse of :meth:`to_dict`; also accepts the ``qexport_preprocess`` dict of a model factory.

        Args:
            d: dict with ``input_size``, ``mean``, ``std`` and optional ``resize``, ``channels``.

        Returns:
            The Preprocess.
        """
        unknown = set(d) - {"input_size", "mean", "std", "resize", "channels"}
        if unknown:
            raise QexportError(f"unknown preprocessing fields {sorted(unknown)}; expected input_size, mean, std, resize, channels")
        try:
            mean = tuple(d["mean"])
            return cls(
                input_size=tuple(d["input_size"]),
                mean=mean,
                std=tuple(d["std"]),
                resize=d.get("resize"),
                channels=int(d.get("channels", len(mean))),
            )
        except KeyError as e:
            raise QexportError(f"preprocessing dict lacks the field {e.args[0]!r}") from None

    def with_overrides(
        self,
        input_size: Sequence[int] | int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> "Preprocess":
        """Replace preset fields by user overrides.

        A new input size scales ``resize`` in proportion (256/224 stays 256/224); mean/std of another length
        change the channel count (both must then be given).

        Args:
            input_size: new (H, W) or a single int for a square input.
            mean: new per-channel mean.
            std: new per-channel std.

        Returns:
            The new Preprocess.
        """
        p = self
        if input_size is not None:
            size = (int(input_size), int(input_size)) if isinstance(input_size, int) else tuple(int(v) for v in input_size)
            if len(size) == 1:
                size = (size[0], size[0])
            resize = None
            if p.resize is not None:
                resize = max(min(size), round(min(size) * p.resize / min(p.input_size)))
            p = replace(p, input_size=size, resize=resize)
        if mean is not None or std is not None:
            mean = tuple(mean) if mean is not None else p.mean
            std = tuple(std) if std is not None else p.std
            if len(mean) != len(std):
                raise QexportError(f"--mean and --std need the same number of values, got {len(mean)} and {len(std)}")
            p = replace(p, mean=mean, std=std, channels=len(mean))
        return p


CIFAR_PRESET = Preprocess(input_size=(32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=None)
IMAGENET_PRESET = Preprocess(input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=256)
