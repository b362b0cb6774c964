"""AdaSG game iterations per second: ``torchrun --nproc-per-node N`` (gloo, CPU) against one process.

    python bench/adasg_torchrun.py [--nproc 2] [--rounds 2] [--epochs 3] [--iters-per-epoch 40]

Each run is the real command line, ``qexport calibrate cifar:resnet20 --method adasg --bits w4a4 --batch-size 16``
(the shared ResNet-20 checkpoint when present, else random weights: the speed is the same), with one thread per
process (``OMP_NUM_THREADS=1``). Under torchrun each rank draws 16/N of every batch and the gradients are averaged,
so an iteration is the same amount of work as in one process. The figure is the game iterations (after the warm-up
epoch) divided by their wall time, from the recipe's ``adasg_history.json``; single and multi-process runs
alternate, ``--rounds`` times, and the medians are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(nproc: int, args, work: Path, tag: str) -> float:
    """One calibration; returns game iterations per second.

    Args:
        nproc: processes (1: plain ``python -m qexport``).
        args: command-line arguments.
        work: scratch folder.
        tag: output folder name.

    Returns:
        Iterations per second after the warm-up.
    """
    from qexport import shared

    out = work / tag
    model = ["cifar:resnet20"]
    ckpt = shared.cifar_checkpoint(20)
    if ckpt is not None:
        model += ["--weights", str(ckpt)]
    tail = ["calibrate", *model, "--method", "adasg", "--bits", "w4a4", "--batch-size", "16", "--epochs",
            str(args.epochs), "--iters-per-epoch", str(args.iters_per_epoch), "--device", "cpu", "--quiet",
            "--seed", "0", "-o", str(out)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "qexport", *tail]
    else:
        torchrun = shutil.which("torchrun")
        cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"])
        cmd += ["--standalone", "--nproc-per-node", str(nproc), "-m", "qexport", *tail]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    hist = json.loads((out / "adasg_history.json").read_text())["history"]
    warm = [r for r in hist if r["warmup"]]
    game = [r for r in hist if not r["warmup"]]
    t0 = warm[-1]["seconds"] if warm else 0.0
    return sum(r["iters"] for r in game) / max(hist[-1]["seconds"] - t0, 1e-9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="epochs, the first 2 of them warm-up (budget schedule)")
    ap.add_argument("--iters-per-epoch", type=int, default=40)
    args = ap.parse_args()
    one, many = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.rounds):
            one.append(run_once(1, args, Path(d), f"one{i}"))
            many.append(run_once(args.nproc, args, Path(d), f"many{i}"))
            print(json.dumps({"round": i, "one_process_it_s": round(one[-1], 2),
                              f"{args.nproc}_processes_it_s": round(many[-1], 2)}), flush=True)
    m1, mn = statistics.median(one), statistics.median(many)
    print(json.dumps({"one_process_it_s": round(m1, 2), f"torchrun_{args.nproc}_it_s": round(mn, 2),
                      "speedup": round(mn / m1, 2), "cpus": os.cpu_count(), "load_avg": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
