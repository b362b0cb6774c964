"""What a checkpoint of the training loop holds besides the task: the global RNG states, and weight digests."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def capture_rng() -> dict:
    """The global RNG states of torch (and CUDA when in use), Python and NumPy."""
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def restore_rng(st: dict) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def module_digest(module: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of a module's parameters and buffers, bit for bit."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
