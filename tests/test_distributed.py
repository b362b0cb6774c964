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


def _env(trace: Path) -> dict:
    return {**os.environ, "QEXPORT_TRACE_STEPS": str(trace), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}


def _cmd(out: Path, epochs: int, ipe: int, *extra: str) -> list[str]:
    return [*_torchrun(), "--standalone", "--nproc-per-node", "2", *_qexport(), "calibrate", TINY, "--method", "adasg",
            "--bits", "w4a4", "--epochs", str(epochs), "--iters-per-epoch", str(ipe), "--batch-size", "8",
            "--device", "cpu", "--quiet", "-o", str(out), *extra]


def test_adasg_two_gloo_processes_stay_identical(tmp_path):
    trace, out = tmp_path / "trace", tmp_path / "out"
    trace.mkdir()
    res = subprocess.run(_cmd(out, 3, 3), env=_env(trace), capture_output=True, text=True, timeout=240)
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


@pytest.mark.slow
def test_ctrl_c_under_torchrun_then_resume_gives_the_uninterrupted_recipe(tmp_path):
    """Ctrl-C to torchrun (it forwards SIGINT to both ranks) in the game epochs: the ranks stop after the same
    step, rank 0 writes one checkpoint holding both ranks' RNG states, no recipe; ``--resume`` under torchrun
    then writes the recipe of an uninterrupted 2-process run, bit for bit."""
    import signal
    import time

    from safetensors.torch import load_file

    full, cut = tmp_path / "full", tmp_path / "cut"
    for d in ("t_full", "t_cut", "t_resume"):
        (tmp_path / d).mkdir()
    res = subprocess.run(_cmd(full, 4, 4), env=_env(tmp_path / "t_full"), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    proc = subprocess.Popen(_cmd(cut, 4, 4), env=_env(tmp_path / "t_cut"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    trace0 = tmp_path / "t_cut" / "rank0.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if trace0.is_file() and len(trace0.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not cut.exists(), err[-3000:]
    ckpt = tmp_path / ".cut.work" / "adasg_checkpoint.pt"
    import torch

    st = torch.load(ckpt, weights_only=False)
    assert len(st["ranks"]) == 2 and st["epoch"] * 4 + st["it"] < 16
    res = subprocess.run(_cmd(cut, 4, 4, "--resume"), env=_env(tmp_path / "t_resume"), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(str(full / "tensors.safetensors")), load_file(str(cut / "tensors.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ga, gb = load_file(str(full / "generator.safetensors")), load_file(str(cut / "generator.safetensors"))
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
