"""brecq: blocks from the graph, learned rounding lowers the block error, integers on the grid, resume, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import run_in_fresh_process, sigint_at_step
from qexport.calibrators.base import CalibrationContext
from qexport.calibrators.blocks import find_blocks
from qexport.calibrators.brecq import CHECKPOINT, BrecqConfig, calibrate_brecq
from qexport.errors import QexportError
from qexport.models import fold_batchnorm, load_model
from qexport.quant.plan import build_plan
from qexport.quant.quantsim import QuantSim
from qexport.quant.spec import BitsConfig

TINY = "tests_support.models:tiny_net"
FAST = BrecqConfig(iters=60, act_iters=20, batch_size=16)
LONGER = BrecqConfig(iters=200, act_iters=20, batch_size=16)


def _sim(spec: str, bits: str = "w4a4"):
    loaded = load_model(spec, None)
    folded = fold_batchnorm(loaded.model)
    return loaded, folded, QuantSim(folded, build_plan(folded, "onnxruntime", BitsConfig.parse(bits)))


def _ctx(spec=TINY, bits="w4a4", n=96, **kw):
    loaded, folded, sim = _sim(spec, bits)
    data = torch.randn(n, *loaded.input_shape, generator=torch.Generator().manual_seed(1))
    return CalibrationContext(sim=sim, folded=folded, model=loaded, data=data, labels=None, quiet=True, **kw)


@pytest.mark.parametrize("spec,blocks,residual", [(TINY, 3, 1), ("cifar:resnet20", 11, 9),
                                                  ("torchvision:resnet18", 10, 8),
                                                  ("torchvision:mobilenet_v2", 33, 10)])
def test_blocks_found_from_the_graph(spec, blocks, residual):
    _, _, sim = _sim(spec)
    found = find_blocks(sim.gm, set(sim.layers()))
    assert len(found) == blocks
    assert sum(b.residual for b in found) == residual
    layers = [n for b in found for n in b.layers]
    assert layers == list(sim.layers())  # every quantized layer once, in order


@pytest.mark.parametrize("bits", ["w4a4", "w3a3", "w2a4"])
def test_reconstruction_beats_round_to_nearest_and_lands_on_the_grid(bits):
    ctx = _ctx(bits=bits)
    metrics = calibrate_brecq(ctx, LONGER)
    per_block = metrics["block_metrics"]
    assert sum(b["rounded_error"] for b in per_block) < sum(b["rtn_error"] for b in per_block)
    assert all(b["rounded_error"] <= b["rtn_error"] for b in per_block)  # never worse: nearest is the fallback
    assert all(b["final_error"] <= b["rounded_error"] for b in per_block)
    assert any(b["kept"]["learned_rounding"] for b in per_block)
    for layer in ctx.sim.layers().values():
        spec = layer.weight_quantizer.spec
        s = layer.weight_quantizer.scale.detach().view(-1, *[1] * (layer.weight.dim() - 1))
        q = layer.int_weight()
        assert torch.equal(q.float() * s, layer.weight.detach())  # exactly integer * per-channel scale
        assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
        assert layer.weight_quantizer.scale.numel() == layer.weight.shape[0]  # per channel


def test_resume_after_interrupt_is_bit_identical(tmp_path, monkeypatch):
    import qexport.calibrators.brecq as brecq

    ref = _ctx()
    calibrate_brecq(ref, FAST)
    work = tmp_path / "work"
    work.mkdir()
    ctx = _ctx(work_dir=work)
    real, calls = brecq.reconstruct_block, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(brecq, "reconstruct_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate_brecq(ctx, FAST)
    monkeypatch.setattr(brecq, "reconstruct_block", real)
    resumed = _ctx(work_dir=work, resume=True)
    metrics = calibrate_brecq(resumed, FAST)
    assert len(metrics["block_metrics"]) == 3
    for a, b in zip(ref.sim.state_dict().values(), resumed.sim.state_dict().values()):
        assert torch.equal(a, b)


def _interrupted_brecq(work: Path, stop_at: int) -> None:
    """The interrupted run of the next test, in a fresh process: a real SIGINT during phase step ``stop_at``."""
    from qexport.calibrators import brecq_core

    count = sigint_at_step(brecq_core._Phase, stop_at)
    try:
        calibrate_brecq(_ctx(work_dir=work), FAST)
    except KeyboardInterrupt:
        print(f"interrupted steps={count['started']} done={count['finished']}")


def test_ctrl_c_inside_a_phase_finishes_the_step_then_resumes_bit_identically(tmp_path):
    """The phases run on the shared training loop: a SIGINT in the middle of the second block's rounding lets the
    step under way finish, raises KeyboardInterrupt, keeps the first block's checkpoint; --resume then equals an
    uninterrupted run. The interrupted run is a fresh process (a SIGINT raised late inside the long default-suite
    process once ended it with SIGSEGV)."""
    ref = _ctx()
    calibrate_brecq(ref, FAST)
    work = tmp_path / "work"
    work.mkdir()
    stop_at = FAST.iters + FAST.act_iters + 10  # block 2, rounding step 10
    res = run_in_fresh_process(Path(__file__), "_interrupted_brecq", work, stop_at)
    assert f"interrupted steps={stop_at} done={stop_at}" in res.stdout, res.stdout + res.stderr[-2000:]
    assert torch.load(work / CHECKPOINT, weights_only=False)["next"] == 1
    resumed = _ctx(work_dir=work, resume=True)
    calibrate_brecq(resumed, FAST)
    for a, b in zip(ref.sim.state_dict().values(), resumed.sim.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("opts,fragment", [({"iters": 0}, "--iters"), ({"loss": "kl"}, "--loss"),
                                           ({"time_budget": "soon"}, "--time-budget"),
                                           ({"drop_prob": 1.0}, "--drop-prob"), ({"drop_prob": -0.1}, "--drop-prob")])
def test_bad_options(opts, fragment):
    with pytest.raises(QexportError, match=fragment):
        BrecqConfig(**opts)


class _Shared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.conv(torch.relu(self.conv(x))).mean((2, 3)))


def test_a_shared_layer_is_refused():
    from torch import fx

    folded = fx.symbolic_trace(_Shared())
    with pytest.raises(QexportError, match="more than once"):
        find_blocks(folded, {"conv", "fc"})


def test_cli_brecq_writes_a_recipe(qx, tiny_images, tmp_path):
    out = tmp_path / "recipe"
    res = qx("calibrate", TINY, "--method", "brecq", "--bits", "w4a4", "--data", tiny_images, "--num-samples", "32",
             "--time-budget", "3s", "-q", "-o", out)
    assert res.code == 0, res.err
    assert (out / "recipe.json").is_file()
    res = qx("calibrate", TINY, "--method", "brecq", "--bits", "w4a4", "-q", "-o", tmp_path / "r2")
    assert res.code == 2 and "--data" in res.err and not (tmp_path / "r2").exists()


def test_fisher_weighted_loss_runs_and_stays_on_the_grid():
    ctx = _ctx(n=64)
    metrics = calibrate_brecq(ctx, BrecqConfig(iters=30, act_iters=10, batch_size=16, loss="fisher"))
    assert len(metrics["block_metrics"]) == 3
    for layer in ctx.sim.layers().values():
        s = layer.weight_quantizer.scale.detach().view(-1, *[1] * (layer.weight.dim() - 1))
        assert torch.equal(layer.int_weight().float() * s, layer.weight.detach())


def test_qdrop_mixes_float_and_quantized_activations_only_while_entered():
    from qexport.calibrators.brecq import _block_quantizers
    from qexport.calibrators.brecq_core import ActivationDrop

    ctx = _ctx(n=16)
    calibrate_brecq(ctx, BrecqConfig(iters=1, act_iters=0, batch_size=16))  # scales set
    sim, aq = ctx.sim, next(iter(ctx.sim.act_quantizers().values()))
    x = ctx.data
    quantized = aq(x)
    with ActivationDrop([aq], 0.5, seed=3):
        mixed = aq(x)
    floats = (mixed == x) & (quantized != x)
    assert 0.4 < float(floats.sum()) / float((quantized != x).sum()) < 0.6  # about half the elements kept float
    assert torch.equal(mixed[~floats], quantized[~floats])
    assert torch.equal(aq(x), quantized)  # the hooks are gone on exit
    block = find_blocks(sim.gm, set(sim.layers()))[1]
    assert len(_block_quantizers(sim, block, False)) >= len(_block_quantizers(sim, block)) > 0


def test_qdrop_reconstruction_stays_on_the_grid_and_differs_from_brecq():
    plain, dropped = _ctx(), _ctx()
    calibrate_brecq(plain, FAST)
    metrics = calibrate_brecq(dropped, dataclasses.replace(FAST, drop_prob=0.5))
    assert all(b["final_error"] <= b["rtn_error"] for b in metrics["block_metrics"])  # never worse than nearest
    differs = False
    for name, layer in dropped.sim.layers().items():
        s = layer.weight_quantizer.scale.detach().view(-1, *[1] * (layer.weight.dim() - 1))
        assert torch.equal(layer.int_weight().float() * s, layer.weight.detach())
        differs |= not torch.equal(layer.int_weight(), plain.sim.layers()[name].int_weight())
    assert differs  # the drop changes what the rounding learns
