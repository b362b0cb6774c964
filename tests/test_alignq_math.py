"""AlignQ's mathematics (qexport/calibrators/alignq_core.py): the grid, the alignment, the ADMM term."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qexport.calibrators.alignq_core import (AlignedWeightQuantizer, CorrelationADMM, aligned_levels, cdf_align,
                                             correlation, correlation_change)
from qexport.errors import QexportError
from qexport.quant.aligned import aligned_forward, default_in_scale
from qexport.quant.fake_quant import channel_view, fake_quant
from qexport.quant.quantsim import WeightQuantizer
from qexport.quant.spec import QuantSpec, weight_spec


def _ks_uniform(u: np.ndarray, lo: float = -1.0, hi: float = 1.0) -> float:
    """Kolmogorov-Smirnov distance of a sample to Uniform(lo, hi)."""
    u = np.sort(u.ravel())
    cdf = np.clip((u - lo) / (hi - lo), 0, 1)
    i = np.arange(1, u.size + 1) / u.size
    return float(max(np.max(i - cdf), np.max(cdf - (i - 1 / u.size))))


@pytest.mark.parametrize("bits, n", [(4, 7), (3, 3), (2, 1)])
def test_aligned_weights_are_integers_on_the_grid(bits, n):
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.1 + 0.02
    wq = AlignedWeightQuantizer(WeightQuantizer(weight_spec(bits), 6))
    wq.init_scale(w)
    q = wq.int_weight(w)
    assert wq.n == n and q.dtype == torch.int8 and int(q.abs().max()) == n
    assert set(torch.unique(q).tolist()) <= set(range(-n, n + 1))
    out = wq(w)
    assert torch.equal(out, q.float() * channel_view(wq.scale, 4))  # exactly integer x per-channel scale
    # the recipe's plain quantizer reproduces it bit for bit (what build_quantsim relies on)
    assert torch.equal(fake_quant(out, channel_view(wq.scale, 4), wq.spec.qmin, wq.spec.qmax), out)
    assert torch.all(wq.scale > 0)


def test_weight_alignment_is_straight_through():
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    aligned_levels(w, 7).sum().backward()
    assert w.grad is not None and torch.all(torch.isfinite(w.grad)) and w.grad.abs().sum() > 0


def test_alignment_maps_a_normal_sample_to_near_uniform():
    """The statistical check: KS distance to Uniform(-1, 1) is small after alignment, large without it."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 4096, generator=g) * torch.linspace(0.05, 2.0, 8)[:, None] + 0.3  # channels differ
    u = cdf_align(w, per_channel=True).numpy()
    for c in range(8):
        assert _ks_uniform(u[c]) < 0.03, c
    ident = (w / w.abs().amax(1, keepdim=True)).numpy()  # the identity on the same range (min-max grid)
    assert min(_ks_uniform(ident[c]) for c in range(8)) > 0.15
    levels = aligned_levels(w, 7).numpy().ravel()  # near-uniform use of the 15 levels (ends get half bins)
    freq = np.array([(levels == k).mean() for k in range(-7, 8)])
    assert np.all(np.abs(freq[1:-1] - 1 / 14) < 0.01) and np.all(np.abs(freq[[0, -1]] - 1 / 28) < 0.01)


def test_activation_alignment_is_uniform_on_bn_outputs():
    """erf(x / sqrt 2) of standard-normal BN outputs after ReLU: the positive half is Uniform(0, 1)."""
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(3)).clamp_min(0)
    spec, in_spec = QuantSpec(4, signed=False), QuantSpec(8, signed=False)
    y = aligned_forward(x, torch.tensor(default_in_scale(spec, in_spec)), in_spec, 2.0,
                        torch.tensor(2.0 / 15), spec)
    pos = (y[x > 0] / 2.0).numpy()
    assert _ks_uniform(pos, 0.0, 1.0) < 0.04
    assert _ks_uniform((x[x > 0] / x.max()).numpy(), 0.0, 1.0) > 0.3  # the identity is far from uniform


def test_correlation_change_is_zero_for_a_scaled_copy():
    x = torch.randn(8, 3, 5, 5, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(torch.diagonal(correlation(x)), torch.ones(8), atol=1e-5)
    assert correlation_change(x, 3.0 * x + 0.0).abs().max() < 1e-5


def _toy_d(x, gamma, beta):
    spec, in_spec = QuantSpec(3, signed=False), QuantSpec(8, signed=False)
    s_in = torch.tensor(default_in_scale(spec, in_spec))
    after = aligned_forward(torch.relu(x * gamma + beta), s_in, in_spec, 2.0, torch.tensor(2.0 / 7), spec)
    return correlation_change(x, after)


def test_admm_term_falls_over_a_few_steps():
    """A BN-like affine before an aligned 3-bit point, trained on the ADMM term alone: the correlation change
    D and the ADMM objective fall; Z and the dual engage; state round-trips."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g) @ torch.randn(4, 64, generator=g) + 0.3 * torch.randn(16, 64, generator=g)
    gamma = torch.nn.Parameter(torch.full((64,), 3.0))
    beta = torch.nn.Parameter(torch.zeros(64))
    admm = CorrelationADMM(mu=0.2, rho=0.3)
    opt = torch.optim.SGD([gamma, beta], lr=50.0)
    rms, objective = [], []
    for _ in range(15):
        loss = admm.penalty("p", _toy_d(x, gamma, beta))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            d = _toy_d(x, gamma, beta)
        admm.update("p", d)
        rms.append(float(d.pow(2).mean().sqrt()))
        objective.append(admm.objective("p", d))
    assert rms[-1] < 0.95 * rms[0]
    assert float(admm.z["p"].norm()) > 0 and float(admm.g["p"].abs().sum()) > 0
    engaged = [i for i in range(15) if i > 0 and objective[i] < objective[i - 1]]
    assert objective[-1] < max(objective) and len(engaged) >= 5
    clone = CorrelationADMM()
    clone.load_state_dict(admm.state_dict())
    assert torch.equal(clone.z["p"], admm.z["p"]) and torch.equal(clone.g["p"], admm.g["p"])


def test_admm_shrinks_small_changes_to_zero_and_skips_other_batch_sizes():
    admm = CorrelationADMM(mu=0.2, rho=0.3)
    d = torch.full((4, 4), 0.01)
    admm.update("p", d)
    assert torch.count_nonzero(admm.z["p"]) == 0  # ||V|| below mu/rho: Z = 0
    assert float(admm.penalty("p", torch.ones(3, 3))) == 0.0  # another batch size: no term
    with pytest.raises(QexportError, match="rho"):
        CorrelationADMM(mu=0.2, rho=0.0)


def test_trained_batchnorm_folds_into_levels_scale_and_bias_exactly():
    from qexport.calibrators.alignq_bn import attach_channel_bn, fold_channel_bn

    g = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(3, 4, 3, bias=True)
    q = torch.randint(-7, 8, conv.weight.shape, generator=g).float()
    s = torch.rand(4, generator=g) * 0.1 + 0.01
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        conv.weight.copy_(q * s.view(-1, 1, 1, 1))
        bn.weight.copy_(torch.tensor([0.5, -1.5, 2.0, -0.2]))  # negative scales: levels flip sign
        bn.bias.copy_(torch.tensor([0.1, -0.3, 0.0, 1.0]))
    cbn = attach_channel_bn(conv, bn)
    assert torch.equal(cbn.weight.data, bn.weight.abs())  # starts at the float BN's magnitude and shift
    x = torch.randn(16, 3, 8, 8, generator=g)
    first = conv(x)
    dims = (0, 2, 3)
    assert torch.allclose(first.mean(dims), cbn.bias.data, atol=1e-5)  # standardised, then shifted and scaled
    with torch.no_grad():
        cbn.weight.mul_(torch.tensor([1.0, -1.0, 1.0, 1.0]))  # as if training had pushed one scale negative
        for _ in range(3):
            conv(torch.randn(16, 3, 8, 8, generator=g) * 2 + 0.5)  # training batches move the running statistics
    conv.eval()
    with torch.no_grad():
        ref = conv(x)
        q2, s2 = fold_channel_bn(conv, q, s)
        conv.weight.copy_(q2 * s2.view(-1, 1, 1, 1))
        out = conv(x)
    assert not hasattr(conv, "train_bn") and not conv._forward_hooks
    assert torch.equal(q2.abs(), q.abs()) and bool((s2 > 0).all())
    assert torch.allclose(out, ref, atol=1e-4), float((out - ref).abs().max())
