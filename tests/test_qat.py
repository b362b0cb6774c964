"""QAT: the binary grid, the trainer, ``ste`` (learned steps) and ``md`` (mirror descent) on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, assert_user_error, run_in_fresh_process, sigint_at_step, write_png_folder
from qexport.calibrators.base import CalibrationContext
from qexport.errors import QexportError
from qexport.quant.fake_quant import fake_quant, quantize_to_int
from qexport.quant.spec import BitsConfig, QuantSpec, weight_spec


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """4 classes x 12 random 16x16 PNGs (tiny_net has 4 outputs)."""
    return write_png_folder(tmp_path_factory.mktemp("qat_imgs"), classes=4, per_class=12)


def _ctx(data: Path, bits: str, first_last: int | None = None, work: Path | None = None) -> CalibrationContext:
    from qexport.models import fold_batchnorm, load_model
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim

    torch.manual_seed(0)
    loaded = load_model(TINY, None)
    folded = fold_batchnorm(loaded.model)
    plan = build_plan(folded, "onnxruntime", BitsConfig.parse(bits, first_last))
    return CalibrationContext(sim=QuantSim(folded, plan), folded=folded, model=loaded, data=None, labels=None,
                              quiet=True, data_dir=data, work_dir=work)


def _calibrate(tmp: Path, data: Path, method: str, bits: str, **options) -> Path:
    from qexport.calibrate import CalibrateConfig, calibrate

    return calibrate(CalibrateConfig(model=TINY, output=tmp / f"{method}_{bits}", method=method, bits=bits,
                                     first_last_bits=8, data=str(data), quiet=True,
                                     options={"epochs": 2, "batch_size": 8, **options}))


# ---------------------------------------------------------------- binary grid
def test_binary_grid_has_no_zero_level():
    spec = weight_spec(1)
    assert spec.binary and spec.levels == 2 and spec.grid() == (-1, 1)
    assert not QuantSpec(2).binary and QuantSpec(2).grid() == (-2, -1, 0, 1)
    assert not spec.holds(torch.tensor([1, 0, -1])) and spec.holds(torch.tensor([1, -1]))
    x = torch.tensor([-0.3, 0.0, 0.2, 2.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = fake_quant(x, s, spec.qmin, spec.qmax, binary=True)
    assert y.tolist() == [-0.5, 0.5, 0.5, 0.5]  # 0 goes to +1: no zero level
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0]  # straight through inside [-s, s]
    assert s.grad is not None and float(s.grad) != 0.0
    assert quantize_to_int(x, s, -1, 1, binary=True).tolist() == [-1, 1, 1, 1]


def test_recipe_with_zero_in_a_binary_layer_is_refused(tmp_path, labelled):
    from safetensors.torch import load_file, save_file

    from qexport.recipe import QuantRecipe

    out = _calibrate(tmp_path, labelled, "ste", "w1a8")
    t = load_file(str(out / "tensors.safetensors"))
    assert set(t["int_weight/conv2"].unique().tolist()) <= {-1, 1}
    t["int_weight/conv2"].view(-1)[0] = 0
    save_file(t, str(out / "tensors.safetensors"))
    with pytest.raises(QexportError, match="binary grid"):
        QuantRecipe.load(out)


# ---------------------------------------------------------------- ste
def test_ste_learns_step_sizes(labelled):
    from qexport.calibrators.qat import QATConfig
    from qexport.calibrators.qat_task import QATTask
    from qexport.calibrators.ste import SteMethod
    from qexport.training import qat_data

    ctx = _ctx(labelled, "w4a4")
    task = QATTask(ctx, QATConfig(batch_size=8, lr=1e-2), SteMethod())
    w0 = {n: l.weight_quantizer.scale.detach().clone() for n, l in task.sim.layers().items()}
    a0 = {n: float(a.scale.detach()) for n, a in task.sim.act_quantizers().items()}
    g = torch.Generator().manual_seed(0)
    order = qat_data.epoch_order(task.split, 0, 0)
    for i in range(4):
        x, y = qat_data.train_batch(task.split, order[i * 8 : (i + 1) * 8], g)
        m = task.update(x, y, i / 4)
    assert m["loss"] > 0
    moved_w = [n for n, l in task.sim.layers().items() if not torch.equal(l.weight_quantizer.scale, w0[n])]
    moved_a = [n for n, a in task.sim.act_quantizers().items() if float(a.scale.detach()) != a0[n]]
    assert moved_w == list(w0) and moved_a, (moved_w, moved_a)



# ---------------------------------------------------------------- distillation
def test_distillation_loss_is_the_tempered_kl():
    from qexport.calibrators.qat_task import distillation_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert float(distillation_loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    p, q = torch.softmax(s / 2, 1), torch.softmax(t / 2, 1)
    by_hand = 4.0 * (q * (q.log() - p.log())).sum(1).mean()  # T^2 KL(teacher || student), batch mean
    assert float(distillation_loss(s, t, 2.0)) == pytest.approx(float(by_hand), rel=1e-5)


def _distilled_weights(data: Path, distill: float, label_shift: int) -> dict:
    """ste W4A4 for 3 steps with the labels shifted by ``label_shift`` classes; the trained weights."""
    from qexport.calibrators.qat import QATConfig
    from qexport.calibrators.qat_task import QATTask
    from qexport.calibrators.ste import SteMethod
    from qexport.training import qat_data

    task = QATTask(_ctx(data, "w4a4"), QATConfig(batch_size=8, lr=1e-2, distill=distill), SteMethod())
    g = torch.Generator().manual_seed(0)
    order = qat_data.epoch_order(task.split, 0, 0)
    for i in range(3):
        x, y = qat_data.train_batch(task.split, order[i * 8 : (i + 1) * 8], g)
        m = task.update(x, (y + label_shift) % 4, i / 3)
    assert ("kd" in m) == (distill > 0)
    return {k: v.detach().clone() for k, v in task.sim.state_dict().items()}


def test_full_distillation_follows_the_float_model_not_the_labels(labelled):
    """distill=1 trains on the float model's outputs alone: wrong labels change nothing; at 0.5 they do."""
    for distill, same in ((1.0, True), (0.5, False)):
        a, b = _distilled_weights(labelled, distill, 0), _distilled_weights(labelled, distill, 1)
        assert all(torch.equal(a[k], b[k]) for k in a) == same, distill
    from qexport.calibrators.qat import QATConfig

    with pytest.raises(QexportError, match="distill must be in"):
        QATConfig(distill=1.5)


@pytest.mark.parametrize("method", ["ste", "md"])
def test_activation_scales_start_from_the_prepared_weights(labelled, method, monkeypatch):
    """Activation ranges are observed on the network training starts from: the method's weight scales, not
    QuantSim's unit ones (with those nearly every weight rounds to 0 and a ReLU's scale lands on the 1e-8 floor)."""
    from qexport.calibrators import qat_task
    from qexport.calibrators.md import MDConfig, MDMethod
    from qexport.calibrators.qat import QATConfig
    from qexport.calibrators.ste import SteMethod

    seen = {}
    real = qat_task.calibrate_activations

    def spy(sim, *args, **kwargs):
        seen.update({n: l.weight_quantizer.scale.detach().clone() for n, l in sim.layers().items()})
        return real(sim, *args, **kwargs)

    monkeypatch.setattr(qat_task, "calibrate_activations", spy)
    cfg = MDConfig(batch_size=8) if method == "md" else QATConfig(batch_size=8)
    task = qat_task.QATTask(_ctx(labelled, "w2a8" if method == "md" else "w8a8"), cfg,
                            MDMethod(cfg) if method == "md" else SteMethod())
    for name, layer in task.sim.layers().items():
        assert torch.equal(seen[name], layer.weight_quantizer.scale.detach()), name
        assert not torch.all(seen[name] == 1.0), name
    assert all(float(a.scale.detach()) > 1e-6 for a in task.sim.act_quantizers().values())



@pytest.mark.parametrize("method, factor", [("ste", 1.0), ("md", 0.1)])
def test_activation_step_sizes_take_the_methods_share_of_the_lr(labelled, method, factor):
    """md's peak lr is u's: its activation step sizes take a tenth (at Adam's 1e-3 a ~1e-3 step collapses to the
    1e-8 floor within a few steps, and ONNX Runtime then refuses the pool's scale ratio)."""
    from qexport.calibrators.md import MDConfig, MDMethod
    from qexport.calibrators.qat import QATConfig
    from qexport.calibrators.qat_task import QATTask
    from qexport.calibrators.ste import SteMethod

    cfg = MDConfig(batch_size=8) if method == "md" else QATConfig(batch_size=8)
    m = MDMethod(cfg) if method == "md" else SteMethod()
    task = QATTask(_ctx(labelled, "w8a8"), cfg, m)
    acts = {id(a.scale) for a in task.sim.act_quantizers().values()}
    (group,) = [g for g in task.optimizer.param_groups if {id(p) for p in g["params"]} & acts]
    assert group["lr"] == pytest.approx(m.default_lr["adam"] * factor)


def test_activation_step_sizes_cannot_collapse_below_their_floor(labelled):
    """However large the lr, a learned activation step stays at or above ACT_SCALE_FLOOR of its initial value."""
    from qexport.calibrators.qat import QATConfig
    from qexport.calibrators.qat_task import ACT_SCALE_FLOOR, QATTask
    from qexport.calibrators.ste import SteMethod

    task = QATTask(_ctx(labelled, "w4a4"), QATConfig(batch_size=8), SteMethod())
    start = [float(a.scale.detach()) for a in task.sim.act_quantizers().values()]
    acts = {id(a.scale) for a in task.sim.act_quantizers().values()}
    for g in task.optimizer.param_groups:
        if {id(p) for p in g["params"]} & acts:
            g["lr"] = 1e3  # Adam moves each step size by about the lr: far below zero
    task.base_lrs = [g["lr"] for g in task.optimizer.param_groups]
    x = torch.rand(8, 3, 16, 16)
    task.update(x, torch.arange(8) % 4, 0.0)
    end = [float(a.scale.detach()) for a in task.sim.act_quantizers().values()]
    assert any(e < s for e, s in zip(end, start))  # some step was pushed down...
    assert all(e >= s * ACT_SCALE_FLOOR * (1 - 1e-6) for e, s in zip(end, start))  # ...and stopped at the floor


# ---------------------------------------------------------------- md
def test_md_initial_beta_depends_on_levels_and_schedule_unless_given():
    from qexport.calibrators.md import MDConfig

    binary, ternary = (-1, 1), (-1, 0, 1)
    assert MDConfig().start_beta(binary) == 20.0  # anneal=run, binary: chosen on held-out training images
    assert MDConfig().start_beta(ternary) == 1.0
    assert MDConfig(anneal="paper").start_beta(binary) == 1.0  # the paper's schedule starts at 1
    assert MDConfig(beta_max=10.0).start_beta(binary) == 10.0  # never above the cap
    assert MDConfig(beta_start=3.0, anneal="paper").start_beta(ternary) == 3.0
    with pytest.raises(QexportError, match="beta-start"):
        MDConfig(beta_start=200.0)


@pytest.mark.parametrize("bits,levels", [("w1a8", (-1, 1)), ("w2a8", (-1, 0, 1))])
def test_md_anneals_and_soft_weights_approach_levels(labelled, bits, levels):
    from qexport.calibrators.md import MDConfig, MDMethod
    from qexport.calibrators.qat_task import QATTask
    from qexport.training import qat_data

    method = MDMethod(MDConfig(batch_size=8, beta_start=1.0, beta_max=50.0))  # a wide range to anneal over
    task = QATTask(_ctx(labelled, bits, 8), method.cfg, method)
    assert set(method.md) == {"conv2", "conv3"}  # first and last stay 8-bit (ste)
    m0 = method.md["conv2"]
    assert m0.levels == levels and m0.kind == "tanh"
    gap0 = float((m0.soft() - m0.codes()).abs().mean().detach())
    g = torch.Generator().manual_seed(0)
    order = qat_data.epoch_order(task.split, 0, 0)
    betas, gaps = [], []
    for i in range(5):
        x, y = qat_data.train_batch(task.split, order[i * 8 : (i + 1) * 8], g)
        m = task.update(x, y, i / 5, (i + 1) / 5)
        betas.append(m["beta"])
        gaps.append(m["gap"])
    assert betas == sorted(betas) and betas[-1] == pytest.approx(50.0) and betas[0] > 1.0
    assert gaps[-1] < 0.05 < gap0, (gap0, gaps)  # soft weights end close to the levels
    assert set(m0.codes().unique().tolist()) <= set(levels)


@pytest.mark.parametrize("bits,levels", [("w1a8", {-1, 1}), ("w2a8", {-1, 0, 1})])
def test_md_recipe_integers_are_the_levels_and_export_checks(tmp_path, labelled, bits, levels):
    from qexport.export.check import check_model
    from qexport.export.qdq import build_qdq_model
    from qexport.recipe import QuantRecipe

    out = _calibrate(tmp_path, labelled, "md", bits)
    r = QuantRecipe.load(out)
    for name in ("conv2", "conv3"):
        assert set(r.int_weights[name].unique().tolist()) == levels, name
    assert r.int_weights["conv1"].abs().max() > 1  # the 8-bit first layer
    meta = json.loads((out / "recipe.json").read_text())["metrics"]
    assert meta["md_final_beta"] == pytest.approx(100.0)
    assert meta["md_start_beta"] == (20.0 if bits == "w1a8" else 1.0)
    model = build_qdq_model(r, "onnxruntime")
    assert check_model(model, "onnxruntime") == []
    grids = {p.key: p.value for p in model.metadata_props}["qexport.weight_grids"]
    assert ("binary" if bits == "w1a8" else "int2") in grids
    from onnx import numpy_helper

    init = next(t for t in model.graph.initializer if t.name == "conv2.weight_int8")
    bad = numpy_helper.to_array(init).copy()
    bad.flat[0] = 0 if bits == "w1a8" else -3  # binary: no zero level; 2 bits: -3 is off the grid
    init.CopyFrom(numpy_helper.from_array(bad, init.name))
    assert [v.rule for v in check_model(model, "onnxruntime")] == ["weight-grid"]


def test_md_softmax_any_level_set(tmp_path, labelled):
    from qexport.recipe import QuantRecipe

    out = _calibrate(tmp_path, labelled, "md", "w3a8", levels="-3,-1,0,1,3")
    r = QuantRecipe.load(out)
    assert set(r.int_weights["conv2"].unique().tolist()) <= {-3, -1, 0, 1, 3}
    meta = json.loads((out / "recipe.json").read_text())["metrics"]
    assert meta["md_projection"]["conv2"] == "softmax"


# ---------------------------------------------------------------- bad input
def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, labelled, qx):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(labelled.glob("c0/*.png"))[:4]:
        (flat / p.name).write_bytes(p.read_bytes())
    wrong = write_png_folder(tmp_path / "three", classes=3, per_class=2)
    base = ["calibrate", TINY, "--method", "md", "--bits", "w1a8", "--epochs", "1"]
    res = qx(*base, "--data", flat, "-o", tmp_path / "o1")
    assert_user_error(res, "flat folder", "labelled")
    res = qx(*base, "--data", wrong, "-o", tmp_path / "o2")
    assert_user_error(res, "3 class folders", "4 outputs")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not list(tmp_path.glob(".o*"))  # no work folder either
    from qexport.calibrators.md import MDConfig
    from qexport.calibrators.qat import QATConfig

    with pytest.raises(QexportError, match="val-fraction"):
        QATConfig(val_fraction=0.7)
    with pytest.raises(QexportError, match="no effect without --distill"):
        QATConfig(distill_temperature=4.0)
    QATConfig(distill=0.5, distill_temperature=4.0)
    with pytest.raises(QexportError, match="do not fit the binary grid"):
        _calibrate(tmp_path, labelled, "md", "w1a8", levels="-1,0,1")
    with pytest.raises(QexportError, match="do not fit the 2-bit grid"):
        _calibrate(tmp_path, labelled, "md", "w2a8", levels="-2,0,2")
    assert not (tmp_path / "md_w1a8").exists() and not (tmp_path / "md_w2a8").exists()
    assert not list(tmp_path.glob(".md_*"))
    with pytest.raises(QexportError, match="levels"):
        MDConfig(levels="1")


# ---------------------------------------------------------------- torchrun
def test_torchrun_two_ranks_train_identical_weights_and_write_once(tmp_path, labelled):
    import subprocess
    import sys

    from conftest import TESTS_DIR, subprocess_env

    log = tmp_path / "log"
    log.mkdir()
    out = tmp_path / "runs" / "ddp"
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(TESTS_DIR / "tests_support" / "qat_ddp_worker.py"), str(out), str(labelled), str(log)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (json.loads((log / f"rank{r}.json").read_text()) for r in (0, 1))
    # 43 training images (48 minus 10 % held out): 22 per rank, 6 steps of 4 per epoch, 2 epochs
    assert len(r0) == len(r1) == 12
    assert r0 == r1  # identical weights after every step
    assert len(set(r0)) == len(r0)  # and they did change every step
    assert sorted(x.name for x in (tmp_path / "runs").iterdir()) == ["ddp"]  # one recipe, no leftovers
    from qexport.recipe import QuantRecipe

    r = QuantRecipe.load(out)
    assert r.metrics["world_size"] == 2
    assert set(r.int_weights["conv2"].unique().tolist()) == {-1, 1}


# ---------------------------------------------------------------- resume, size
def _resume_cfg(root: Path, data: Path, name: str, **kw):
    from qexport.calibrate import CalibrateConfig

    return CalibrateConfig(model=TINY, output=root / name, method="md", bits="w2a8", first_last_bits=8,
                           data=str(data), quiet=True, options={"epochs": 2, "batch_size": 8}, **kw)


def _interrupted_qat(root: Path, data: Path, stop_at: int) -> None:
    """The interrupted run of the next test, in a fresh process: a real SIGINT during training step ``stop_at``."""
    from qexport.calibrate import calibrate
    from qexport.calibrators.qat_task import QATTask

    count = sigint_at_step(QATTask, stop_at)
    try:
        calibrate(_resume_cfg(root, data, "cut"))
    except KeyboardInterrupt:
        print(f"interrupted steps={count['started']} done={count['finished']}")


def test_ctrl_c_mid_epoch_finishes_the_step_then_resumes_bit_identically(tmp_path, labelled):
    """The QAT trainer runs on the shared training loop: a SIGINT in the middle of the first epoch (step 3 of 6)
    lets that step finish, writes a checkpoint and no recipe; --resume then equals an uninterrupted run."""
    from qexport.calibrate import calibrate
    from qexport.calibrators.qat_task import CHECKPOINT
    from qexport.recipe import QuantRecipe

    full = QuantRecipe.load(calibrate(_resume_cfg(tmp_path, labelled, "full")))
    res = run_in_fresh_process(Path(__file__), "_interrupted_qat", tmp_path, labelled, 3)
    assert "interrupted steps=3 done=3" in res.stdout, res.stdout + res.stderr[-2000:]
    assert not (tmp_path / "cut").exists()
    ckpt = torch.load(tmp_path / ".cut.work" / CHECKPOINT, weights_only=False)
    assert (ckpt["epoch"], ckpt["it"]) == (0, 3)
    resumed = QuantRecipe.load(calibrate(_resume_cfg(tmp_path, labelled, "cut", resume=True)))
    for name, q in full.int_weights.items():
        assert torch.equal(q, resumed.int_weights[name]), name
        assert torch.equal(full.weight_scales[name], resumed.weight_scales[name]), name
    assert full.act_scales == resumed.act_scales
    assert [r["heldout_top1"] for r in full.metrics["history"]] == [r["heldout_top1"] for r in resumed.metrics["history"]]
    assert not (tmp_path / ".cut.work").exists()


def test_verify_model_size_counts_true_width(tmp_path, labelled):
    from qexport.recipe import QuantRecipe
    from qexport.verify.size import model_size, size_line

    r = QuantRecipe.load(_calibrate(tmp_path, labelled, "md", "w1a8"))
    s = model_size(r)
    n1, n8 = s["per_width"]["1"], s["per_width"]["8"]
    assert n1 == 2 * 8 * 8 * 9 and n8 == 3 * 8 * 9 + 8 * 4  # conv2, conv3 binary; conv1, fc 8-bit
    scales_bias = 4 * (8 + 8 + 8 + 4) + 4 * (8 + 8 + 8 + 4)  # one scale per channel; conv1's folded BN bias too
    assert s["true_width_bytes"] == n1 // 8 + n8 + scales_bias
    assert s["int8_bytes"] == n1 + n8 + scales_bias
    assert s["fp32_bytes"] == 4 * (n1 + n8) + 4 * (8 + 8 + 8 + 4)
    assert "no extra speed" in size_line(s)
