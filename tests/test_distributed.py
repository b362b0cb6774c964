"""Scale-out: AdaSG under real ``torchrun`` with 2 gloo processes on the CPU (issue 11 item 5).

Each rank appends per-step digests of its generator and student to ``QEXPORT_TRACE_STEPS``; after every step both
ranks must hold bit-identical players, while each rank draws its own samples; rank 0 alone writes the recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qexport.training.distributed import DistInfo

TINY = "qexport.zoo.digits:digits_net"


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _qexport() -> list[str]:
    exe = shutil.which("qexport")
    return ["--no-python", exe] if exe else ["-m", "qexport"]


def test_share_splits_a_batch_over_ranks():
    assert [DistInfo(rank=r, world_size=3).share(16) for r in range(3)] == [(0, 6), (6, 11), (11, 16)]
    assert DistInfo().share(16) == (0, 16)


def test_adasg_two_gloo_processes_stay_identical(tmp_path):
    trace, out = tmp_path / "trace", tmp_path / "out"
    trace.mkdir()
    env = {**os.environ, "QEXPORT_TRACE_STEPS": str(trace), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [*_torchrun(), "--standalone", "--nproc-per-node", "2", *_qexport(), "calibrate", TINY, "--method", "adasg",
           "--bits", "w4a4", "--epochs", "3", "--iters-per-epoch", "3", "--batch-size", "8", "--device", "cpu",
           "--quiet", "-o", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0 = [json.loads(x) for x in (trace / "rank0.jsonl").read_text().splitlines()]
    r1 = [json.loads(x) for x in (trace / "rank1.jsonl").read_text().splitlines()]
    assert len(r0) == len(r1) == 9  # 2 warm-up epochs (G only) + 1 game epoch, 3 iterations each
    assert r0 == r1  # generator and student identical on both ranks after every step
    assert len({r["generator"] for r in r0}) == 9  # G trains every step
    assert len({r["student"] for r in r0[6:]}) == 3  # Q trains in the game epoch
    # the recipe, written once by rank 0: no second folder, no leftover temporary or work folder
    rec = json.loads((out / "recipe.json").read_text())
    assert rec["metrics"]["processes"] == 2 and rec["metrics"]["iterations"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "trace"]
