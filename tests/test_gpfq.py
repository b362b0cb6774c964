"""GPFQ: the greedy step against brute force, accumulated form == U form, real model and CLI round trip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from qexport import shared
from qexport.calibrators.gpfq_core import LayerStats, channel_errors, gpfq_accumulated, gpfq_u_form, step_sizes
from qexport.errors import QexportError

SKIP = "shared folder with CIFAR checkpoints/images not found (set QEXPORT_SHARED)"


def _problem(seed: int, g: int = 2, n: int = 4, d: int = 12, m: int = 40, noise: float = 0.2):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(g, n, d, generator=gen, dtype=torch.float64)
    x = torch.randn(g, m, d, generator=gen, dtype=torch.float64)
    xq = x + noise * torch.randn(g, m, d, generator=gen, dtype=torch.float64)
    return w, x, xq


@pytest.mark.parametrize("seed,bits", [(0, 4), (1, 3), (2, 2)])
def test_greedy_step_is_brute_force_optimum_and_u_invariant(seed, bits):
    w, x, xq = _problem(seed)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    delta = step_sizes(w, bits, 0.9, per_channel=True)
    k, u_final = gpfq_u_form(w, x, xq, delta, qmin, qmax, return_u=True)
    levels = torch.arange(qmin, qmax + 1, dtype=torch.float64)
    g, n, d = w.shape
    u = torch.zeros(g, n, x.shape[1], dtype=torch.float64)
    for t in range(d):
        base = u + w[:, :, t, None] * x[:, None, :, t]  # U_{t-1} + w_t X_t
        # brute force: the running error for every level of the alphabet
        cand = base[..., None, :] - (levels[:, None] * delta[..., None, None]) * xq[:, None, None, :, t]
        errs = cand.pow(2).sum(-1)  # (g, n, levels)
        best = levels[errs.argmin(-1)]
        assert torch.equal(k[:, :, t], best), f"column {t}"
        chosen_err = errs.gather(-1, (k[:, :, t] - qmin).long()[..., None]).squeeze(-1)
        assert torch.all(chosen_err <= errs.min(-1).values + 1e-9)
        u = base - (k[:, :, t] * delta)[:, :, None] * xq[:, None, :, t]
        # the invariant U_t = sum_{j<=t} w_j X_j - q_j X~_j
        q = k[:, :, : t + 1] * delta[..., None]
        expect = torch.einsum("gnj,gmj->gnm", w[:, :, : t + 1], x[:, :, : t + 1]) - torch.einsum(
            "gnj,gmj->gnm", q, xq[:, :, : t + 1])
        torch.testing.assert_close(u, expect)
    torch.testing.assert_close(u_final, u)
    assert k.min() >= qmin and k.max() <= qmax


@pytest.mark.parametrize("seed,block,per_channel", [(0, 128, True), (3, 5, True), (4, 7, False)])
def test_accumulated_form_chooses_the_same_integers(seed, block, per_channel):
    w, x, xq = _problem(seed, g=3, n=6, d=30, m=200, noise=0.1)
    delta = step_sizes(w, 4, 1.1, per_channel=per_channel)
    k_u = gpfq_u_form(w, x, xq, delta, -8, 7)
    st = LayerStats.zeros(3, 30)
    for part in range(0, 200, 64):  # accumulated over chunks, as in calibration
        st.add(x[:, part : part + 64], xq[:, part : part + 64])
    k_a = gpfq_accumulated(w, st.h, st.gm, delta, -8, 7, block=block)
    assert torch.equal(k_u, k_a)
    # the error from the moments is the direct one
    q = k_a * delta[..., None]
    err, ref = channel_errors(w, q, st)
    direct = (torch.einsum("gnd,gmd->gnm", w, x) - torch.einsum("gnd,gmd->gnm", q, xq)).pow(2).sum(-1)
    torch.testing.assert_close(err, direct)
    torch.testing.assert_close(ref, torch.einsum("gnd,gmd->gnm", w, x).pow(2).sum(-1))


def test_zero_column_and_zero_channel():
    w, x, xq = _problem(5, g=1, n=3, d=6, m=20)
    x[:, :, 2] = 0
    xq[:, :, 2] = 0
    w[:, 1] = 0
    delta = step_sizes(w, 4, 1.0, per_channel=True)
    k = gpfq_u_form(w, x, xq, delta, -8, 7)
    assert torch.all(k[:, :, 2] == 0) and torch.all(k[:, 1] == 0)
    assert torch.all(delta > 0)


def test_gpfq_beats_rounding_on_a_linear_model():
    """Linear-only model through the calibrator (QuantSim path), vs round-to-nearest at the same scales."""
    from qexport.calibrators.base import CalibrationContext
    from qexport.calibrators.gpfq import GPFQConfig, calibrate_gpfq
    from qexport.models import fold_batchnorm
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.quant.spec import BitsConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    folded = fold_batchnorm(model)
    data = torch.randn(256, 3, 4, 4)
    sim = QuantSim(folded, build_plan(folded, "onnxruntime", BitsConfig.parse("w3", None)))
    ctx = CalibrationContext(sim=sim, folded=folded, model=None, data=data, labels=None, quiet=True)
    metrics = calibrate_gpfq(ctx, GPFQConfig(c="auto", bias_correction=False))
    assert set(metrics["layers"]) == {"1", "3"}
    for layer in sim.layers().values():  # weights lie exactly on the integer grid
        k = layer.weight / layer.weight_quantizer.scale[:, None]
        assert torch.allclose(k, k.round(), atol=1e-4)
        assert k.min() >= -4 and k.max() <= 3
    with torch.no_grad():
        ref = model(data)
        err_gpfq = (sim(data) - ref).norm()
        rtn = QuantSim(folded, sim.plan)  # same steps, rounded to nearest
        for name, layer in rtn.layers().items():
            s = sim.layers()[name].weight_quantizer.scale
            layer.set_quantized_weight(torch.clamp(torch.round(layer.weight / s[:, None]), -4, 3), s)
        err_rtn = (rtn(data) - ref).norm()
    assert err_gpfq < err_rtn


def test_grouped_conv_model_runs():
    """Depthwise + grouped convs: each group is quantized on its own inputs."""
    from qexport.calibrators.base import CalibrationContext
    from qexport.calibrators.gpfq import GPFQConfig, calibrate_gpfq
    from qexport.models import fold_batchnorm
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.quant.spec import BitsConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    folded = fold_batchnorm(model)
    data = torch.randn(64, 3, 12, 12)
    sim = QuantSim(folded, build_plan(folded, "onnxruntime", BitsConfig.parse("w4a8", 8)))
    ctx = CalibrationContext(sim=sim, folded=folded, model=None, data=data, labels=None, quiet=True)
    m = calibrate_gpfq(ctx, GPFQConfig(c="0.9", patch_prob=0.5, per_channel_step=False))
    assert len(m["layers"]) == 4 and m["activations"] == "mse"
    assert [v["bits"] for v in m["layers"].values()] == [8, 4, 4, 8]  # --first-last-bits 8
    assert all(0 <= v["rel_error"] < 1 for v in m["layers"].values())
    for layer in sim.layers().values():  # per-layer step: one scale per layer
        assert torch.allclose(layer.weight_quantizer.scale, layer.weight_quantizer.scale[0].expand_as(
            layer.weight_quantizer.scale))
    assert all(aq.scale.item() != 1.0 for aq in sim.act_quantizers().values())


def test_config_validation():
    from qexport.calibrators.gpfq import GPFQConfig

    assert GPFQConfig(c="auto").c_values()[0] > 0
    assert GPFQConfig(c="0.8").c_values() == (0.8,)
    for bad in (dict(c="x"), dict(c="-1"), dict(patch_prob=0.0), dict(patch_prob=1.5), dict(batch_size=0)):
        with pytest.raises(QexportError):
            GPFQConfig(**bad)


# ---------------------------------------------------------------------------------------------------------------
# Real model (shared folder)


@pytest.fixture(scope="module")
def cifar():
    ckpt, train, test = shared.cifar_checkpoint(20), shared.cifar_images("train"), shared.cifar_images("test-dev")
    if ckpt is None or train is None or test is None:
        pytest.skip(SKIP)
    return ckpt, train, test


def test_resnet20_w4_gpfq_beats_round_to_nearest(cifar):
    from qexport.calibrators.base import CalibrationContext, set_weight_scales
    from qexport.calibrators.gpfq import GPFQConfig, calibrate_gpfq
    from qexport.data import ImageFolder, load_tensor
    from qexport.models import fold_batchnorm, load_model
    from qexport.quant.plan import build_plan
    from qexport.quant.quantsim import QuantSim
    from qexport.quant.spec import BitsConfig

    ckpt, train, test = cifar
    lm = load_model("cifar:resnet20", str(ckpt))
    folded = fold_batchnorm(lm.model)
    xc, _ = load_tensor(ImageFolder(train, lm.preprocess), num_samples=256, seed=0)
    xt, yt = load_tensor(ImageFolder(test, lm.preprocess), num_samples=300, seed=1)
    plan = build_plan(folded, "onnxruntime", BitsConfig.parse("w4", None))

    with torch.no_grad():
        ref = folded(xt)

    def scores(m):
        """(top-1 %, agreement with FP32 predictions %, logit MSE vs FP32)."""
        with torch.no_grad():
            out = m(xt)
        return ((out.argmax(1) == yt).float().mean().item() * 100,
                (out.argmax(1) == ref.argmax(1)).float().mean().item() * 100, (out - ref).pow(2).mean().item())

    rtn = QuantSim(folded, plan)
    set_weight_scales(rtn, "mse")
    rtn.snap_weights()
    sim = QuantSim(folded, plan)
    ctx = CalibrationContext(sim=sim, folded=folded, model=lm, data=xc, labels=None, quiet=True)
    metrics = calibrate_gpfq(ctx, GPFQConfig(c="auto"))
    acc_fp = scores(folded)[0]
    s_rtn, s_gpfq = scores(rtn), scores(sim)
    print(f"resnet20 W4 on 300 test-dev images: fp32 {acc_fp:.2f}, rtn {s_rtn}, gpfq {s_gpfq}")
    assert len(metrics["layers"]) == len(plan.layers)
    # top-1 on a few hundred images is noisy; the model's agreement with FP32 and its logit error are not
    assert s_gpfq[2] < s_rtn[2], (s_rtn, s_gpfq)
    assert s_gpfq[1] >= s_rtn[1], (s_rtn, s_gpfq)
    assert s_gpfq[0] >= acc_fp - 4.0, (acc_fp, s_gpfq)


def test_cli_gpfq_w4a8_exports_and_runs_onnxruntime(cifar, tmp_path):
    ckpt, train, test = cifar
    cli = [sys.executable, "-m", "qexport.cli"]
    recipe = tmp_path / "recipe"
    r = subprocess.run(cli + ["calibrate", "cifar:resnet20", "--weights", str(ckpt), "--method", "gpfq",
                              "--bits", "w4a8", "--data", str(train), "--num-samples", "64", "--c", "0.9",
                              "--patch-prob", "0.25", "--per-channel-step", "--bias-correction", "-q",
                              "--device", "cpu", "-o", str(recipe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((recipe / "recipe.json").read_text())
    layers = meta["metrics"]["layers"]
    assert len(layers) == 20 and all("rel_error" in v for v in layers.values())
    onnx = tmp_path / "model.onnx"
    engine = tmp_path / "engine"
    for args in (["export", str(recipe), "-o", str(onnx)],
                 ["build-engine", str(onnx), "--target", "onnxruntime", "-o", str(engine)],
                 ["verify", str(engine), "--recipe", str(recipe), "--data", str(test), "--num-samples", "64",
                  "--bench-batch", "0", "-q", "--min-agreement", "95"]):
        r = subprocess.run(cli + args, capture_output=True, text=True)
        assert r.returncode == 0, (args[0], r.stdout[-2000:], r.stderr[-3000:])


def test_errors_from_rows_match_moments():
    w, x, xq = _problem(6, g=2, n=5, d=30, m=40)
    q = torch.round(w * 3) / 3
    with_rows = LayerStats.zeros(2, 30)
    with_rows.add(x, xq)
    assert with_rows.rows  # m < 3 d: rows kept
    moments = LayerStats.zeros(2, 30)
    moments.rows = None
    moments.add(x, xq)
    for a, b in zip(channel_errors(w, q, with_rows), channel_errors(w, q, moments)):
        torch.testing.assert_close(a, b)
