"""Fingerprint of tiny deterministic AdaSG runs: sha256 of the recipe tensors, of the generator weights and of the
per-epoch history (timings left out). Used to show that a refactor of the training loop leaves AdaSG's results
bit-identical: run it before and after, on the same machine kind and thread count, and compare.

    OMP_NUM_THREADS=1 python bench/adasg_fingerprint.py

Each case is a few seconds on one core (the 16x16 digits net, random weights, W4A4).
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

CASES = {
    "default": {"epochs": 4, "iters_per_epoch": 3, "warmup_epochs": 1, "batch_size": 8},
    "ema_gdfq_bgexact": {"epochs": 4, "iters_per_epoch": 3, "warmup_epochs": 1, "batch_size": 8, "act_init": "ema",
                         "loss": "gdfq", "bg_exact": True},
    "paper_milestones_nowarmup": {"epochs": 5, "iters_per_epoch": 2, "warmup_epochs": 0, "batch_size": 6,
                                  "schedule": "paper", "lr_q": 0.05},
}


def _sha_tensors(path: Path) -> str:
    from safetensors.torch import load_file

    t = load_file(str(path))
    h = hashlib.sha256()
    for k in sorted(t):
        h.update(k.encode())
        h.update(str(t[k].dtype).encode())
        h.update(t[k].reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(name: str, options: dict, tmp: Path, seed: int = 0) -> dict:
    """Run one tiny case and hash what it wrote.

    Args:
        name: case name (output folder).
        options: AdaSG options.
        tmp: scratch folder.
        seed: the run's seed.

    Returns:
        {"recipe": sha, "generator": sha, "history": sha}.
    """
    from qexport.calibrate import CalibrateConfig, calibrate

    out = calibrate(CalibrateConfig(model="qexport.zoo.digits:digits_net", output=tmp / name, method="adasg",
                                    bits="w4a4", seed=seed, quiet=True, device="cpu", options=options))
    hist = json.loads((out / "adasg_history.json").read_text())["history"]
    for row in hist:
        row.pop("seconds", None)
    return {"recipe": _sha_tensors(out / "tensors.safetensors"),
            "generator": _sha_tensors(out / "generator.safetensors"),
            "history": hashlib.sha256(json.dumps(hist, sort_keys=True).encode()).hexdigest()[:16]}


def main() -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        res = {name: fingerprint(name, opts, Path(d)) for name, opts in CASES.items()}
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
