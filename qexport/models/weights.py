"""Reading weights files (state dicts, safetensors) safely and fitting them to an architecture."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from qexport.errors import QexportError
from qexport.fileio import sha256_file  # noqa: F401  (re-exported)

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def _pickle_globals(p: Path) -> str | None:
    """Scan (never execute) a raw pickle; return the first class/function it would import, if it is valid."""
    import pickletools

    strings: list[str] = []
    first = None
    try:
        with open(p, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(str(arg))
                elif op.name == "GLOBAL" and first is None:
                    first = str(arg).replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and first is None:
                    first = ".".join(strings[-2:]) if len(strings) >= 2 else "a global"
    except Exception:  # noqa: BLE001 - not a valid pickle stream: corrupt
        return None
    return first


def _load_raw(p: Path) -> object:
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise QexportError(
                f"weights file {p} is not a valid safetensors file ({str(e).splitlines()[0]}); re-export or re-download it"
            ) from None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        culprit = None
        if "Weights only load failed" in msg and "Unsupported global" in msg:
            line = next(ln for ln in msg.splitlines() if "Unsupported global" in ln)
            culprit = line.split("Unsupported global:")[-1].split(" was not")[0].replace("GLOBAL", "").strip()
        else:
            culprit = _pickle_globals(p)
        if culprit:
            raise QexportError(
                f"weights file {p} refused ({culprit}): the checkpoint needs arbitrary code execution to load "
                "(weights_only=True); re-save it as a plain state dict or safetensors"
            ) from None
        raise QexportError(
            f"weights file {p} is corrupt or not a PyTorch checkpoint (unpickling failed); re-save or re-download it"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, OSError, EOFError, KeyError ... for bad files
        first = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        raise QexportError(
            f"weights file {p} is corrupt or not a PyTorch checkpoint / safetensors file ({first[:120]}); "
            "re-save or re-download it"
        ) from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` dict.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``.
    A nested ``state_dict`` / ``model`` entry is unwrapped and ``module.`` prefixes (DataParallel) stripped.

    Args:
        path: the weights file.

    Returns:
        The state dict (CPU tensors).
    """
    p = Path(path)
    if not p.exists():
        raise QexportError(f"weights file {p} not found; check the --weights path")
    if not p.is_file():
        raise QexportError(f"weights path {p} is not a file; pass the checkpoint file itself")
    if not os.access(p, os.R_OK):
        raise QexportError(f"weights file {p} is not readable; check its permissions")
    obj = _load_raw(p)
    for _ in range(3):  # {"state_dict": {...}}, {"model": {"state_dict": ...}}
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if inner is not None and not all(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = inner
                continue
        break
    if isinstance(obj, nn.Module):  # cannot happen with weights_only, kept for clarity
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise QexportError(
            f"weights file {p} holds a {type(obj).__name__}, not a dict of tensors; save model.state_dict() instead"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad or not obj:
        what = f"entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}" if bad else "it is empty"
        raise QexportError(
            f"weights file {p} is not a dict of tensors ({what}); save model.state_dict() instead"
        )
    sd = {}
    for k, v in obj.items():
        k = str(k)
        while k.startswith("module."):
            k = k[len("module."):]
        sd[k] = v
    return sd


def _fmt(keys: list[str], n: int = 4) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def apply_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, spec: str) -> None:
    """Load ``sd`` into ``model`` with strict key and shape matching.

    Args:
        model: the architecture.
        sd: the flat state dict from :func:`read_state_dict`.
        source: the weights path, for messages.
        spec: the model spec, for messages.

    Returns:
        None; raises QexportError naming missing/unexpected keys and shape mismatches.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches (file vs model): {_fmt(shapes, 3)}")
        raise QexportError(
            f"weights {source} do not fit {spec}: {'; '.join(parts)}; check the model spec (or --num-classes) matches the checkpoint"
        )
    for k in own:
        if k.endswith("num_batches_tracked") and k not in sd:
            sd = dict(sd)
            sd[k] = own[k]
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
