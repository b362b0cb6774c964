"""One rank of the 2-process torchrun test of the QAT trainer (tests/test_qat.py::test_torchrun_two_ranks).

Usage: torchrun --nproc-per-node 2 qat_ddp_worker.py OUTPUT DATA LOGDIR
Records a digest of every trainable tensor after each step in LOGDIR/rank<R>.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from qexport.calibrate import CalibrateConfig, calibrate
from qexport.training import Callbacks


def main() -> None:
    out, data, log = sys.argv[1:4]
    torch.set_num_threads(1)
    digests = []

    def on_step(task, metrics) -> None:
        h = hashlib.sha256()
        for name, p in sorted(task.sim.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().cpu().numpy().tobytes())
        digests.append(h.hexdigest())

    calibrate(CalibrateConfig(model="tests_support.models:tiny_net", output=Path(out), method="md", bits="w1a8",
                              first_last_bits=8, data=data, quiet=True, device="cpu",
                              options={"epochs": 2, "batch_size": 4}, callbacks=Callbacks(on_step_end=on_step)))
    rank = os.environ.get("RANK", "0")
    Path(log, f"rank{rank}.json").write_text(json.dumps(digests))


if __name__ == "__main__":
    main()
