"""Per-layer sensitivity (``qexport sensitivity``) and ``--bits auto`` (knapsack allocation under a budget)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, assert_user_error, tree
from qexport.quant.layer_bits import mean_weight_bits
from qexport.recipe import QuantRecipe


def _fragile_tiny():
    """tiny_net whose conv2 is fragile at 4 bits: one huge weight per filter on an always-zero input channel sets
    the grid step, so the small weights that carry the signal all round to zero (the output is unchanged in float)."""
    from tests_support.models import tiny_net

    net = tiny_net().eval()
    with torch.no_grad():
        net.conv1.weight[0].zero_()
        net.bn1.running_mean[0], net.bn1.bias[0] = 0.0, -1.0  # channel 0 after ReLU: always 0
        net.conv2.weight.mul_(0.02)
        net.conv2.weight[:, 0, 1, 1] = 5.0
        net.conv2.bias.mul_(0.02)
        net.conv3.weight.mul_(10.0)  # keep conv2's (now small) signal relevant downstream
    return net


def test_sensitivity_ranks_a_fragile_layer_first():
    from qexport.mixed.sensitivity import measure_sensitivity
    from qexport.models import fold_batchnorm

    net = _fragile_tiny()
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    folded = fold_batchnorm(net)
    table = measure_sensitivity(folded, "onnxruntime", [(4, 4)], x, quiet=True)
    order = [r["layer"] for r in table["layers"]]
    assert order[0] == "conv2", [(r["layer"], r["loss"]["w4a4"]) for r in table["layers"]]
    by_w = sorted(table["layers"], key=lambda r: -r["loss"]["w4a4"]["weight"])
    assert by_w[0]["layer"] == "conv2"
    # the same net unmodified: conv2 is not singled out (the ranking reflects the planted fragility)
    from tests_support.models import tiny_net

    plain = measure_sensitivity(fold_batchnorm(tiny_net().eval()), "onnxruntime", [(4, 4)], x, quiet=True)
    c2 = lambda t: next(r for r in t["layers"] if r["layer"] == "conv2")["loss"]["w4a4"]["weight"]  # noqa: E731
    assert c2(table) > 10 * c2(plain)


def test_sensitivity_cli_writes_table_chart_and_heldout(tmp_path, tiny_images, qx):
    out = tmp_path / "sens"
    res = qx("sensitivity", TINY, "--data", tiny_images, "--bits", "w4a4,w2a4", "--num-samples", "16",
             "--heldout", "8", "-q", "-o", out)
    assert res.code == 0, res.err
    assert {"sensitivity.json", "sensitivity.md", "sensitivity.png"} <= tree(out)
    table = json.loads((out / "sensitivity.json").read_text())
    assert table["widths"] == ["w2a4", "w4a4"] and table["heldout_images"] == 8
    assert {r["layer"] for r in table["layers"]} == {"conv1", "conv2", "conv3", "fc"}
    for r in table["layers"]:  # 2-bit weights cost more than 4-bit ones
        assert r["loss"]["w2a4"]["weight"] >= r["loss"]["w4a4"]["weight"] * 0.999
        assert "top1_drop" in r["loss"]["w4a4"]
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,frag", [(["--metric", "l7"], ["--metric"]),
                                       (["--heldout", "100"], ["--heldout 100", "outside"]),
                                       (["--bits", "w4a4,w4"], ["mixes"])])
def test_sensitivity_bad_input(tmp_path, tiny_images, qx, args, frag):
    res = qx("sensitivity", TINY, "--data", tiny_images, "--num-samples", "16", "-q", "-o", tmp_path / "s", *args)
    assert_user_error(res, *frag)
    assert tree(tmp_path) == set()


def test_knapsack_is_exact_on_small_cases():
    from qexport.mixed.allocate import knapsack

    rng = np.random.default_rng(0)
    for _ in range(20):
        items = [[(float(n * b), float(rng.random() / b), b) for b in (2, 4, 8)]
                 for n in rng.integers(10, 100, size=5)]
        budget = float(rng.uniform(sum(c[0][0] for c in items), sum(c[-1][0] for c in items)))
        best = min((combo for combo in itertools.product(*items) if sum(c for c, _, _ in combo) <= budget),
                   key=lambda combo: sum(l for _, l, _ in combo))
        got = knapsack(items, budget)
        got_loss = sum(next(l for _, l, b in ch if b == g) for ch, g in zip(items, got))
        assert sum(next(c for c, _, b in ch if b == g) for ch, g in zip(items, got)) <= budget
        assert got_loss <= sum(l for _, l, _ in best) + 1e-9


def test_bits_auto_meets_the_budget_impossible_budget_says_the_minimum(tmp_path, tiny_images, qx):
    sens = tmp_path / "sens"
    assert qx("sensitivity", TINY, "--data", tiny_images, "--bits", "w2a4,w4a4", "--num-samples", "16", "-q",
              "-o", sens).code == 0
    out = tmp_path / "r"
    res = qx("calibrate", TINY, "--bits", "auto", "--weight-bits-avg", "3", "--sensitivity", sens, "--data",
             tiny_images, "--num-samples", "16", "--method", "minmax", "-q", "-o", out)
    assert res.code == 0, res.err
    rec = QuantRecipe.load(out)
    numels = {n: int(t.numel()) for n, t in rec.int_weights.items()}
    assert mean_weight_bits(rec.plan, numels) <= 3.0
    assert len({lp.weight.bits for lp in rec.plan.layers}) > 1
    assert rec.metrics["mixed_precision"]["mean_weight_bits"] <= 3.0
    res = qx("calibrate", TINY, "--bits", "auto", "--weight-bits-avg", "1.5", "--sensitivity", sens, "--data",
             tiny_images, "--num-samples", "16", "-q", "-o", tmp_path / "r2")
    assert_user_error(res, "--weight-bits-avg 1.5", "below", "2.00 mean weight bits")
    assert not (tmp_path / "r2").exists()


def test_bits_auto_measures_when_no_table(tmp_path, tiny_images):
    from qexport.mixed.allocate import AutoBitsConfig
    from qexport.calibrate import CalibrateConfig, calibrate

    out = calibrate(CalibrateConfig(model=TINY, output=tmp_path / "r", method="mse", bits="auto", data=str(tiny_images),
                                    num_samples=16, quiet=True, auto_bits=AutoBitsConfig(size_kb=1.2, act_bits_avg=6)))
    rec = QuantRecipe.load(out)
    numels = {n: int(t.numel()) for n, t in rec.int_weights.items()}
    assert sum(numels[lp.name] * lp.weight.bits for lp in rec.plan.layers) / 8192 <= 1.2
    mp = rec.metrics["mixed_precision"]
    assert mp["mean_act_bits"] <= 6.0 and mp["sensitivity"].startswith("measured at")


def test_allocation_stays_at_or_above_the_floor_of_the_mean_by_default():
    from qexport.mixed.allocate import allocate

    # four equal layers; the first is very sensitive, the others not: without the floor rule the knapsack pays
    # for 8-bit on the first with 2-bit elsewhere; with it every layer stays >= 4 bits.
    def row(name, w2, w4):
        return {"layer": name, "weights": 100, "input_point": None,
                "loss": {"w2a4": {"weight": w2}, "w4a4": {"weight": w4}}}

    table = {"widths": ["w2a4", "w4a4"], "layers": [row("a", 9.0, 1.0), row("b", 0.1, 0.01), row("c", 0.1, 0.01),
                                                    row("d", 0.1, 0.01)]}
    free = allocate(table, weight_bits_avg=4.5, floor=False)
    assert free["layers"]["a"][0] == 8 and min(w for w, _ in free["layers"].values()) == 2
    floored = allocate(table, weight_bits_avg=4.5)
    assert min(w for w, _ in floored["layers"].values()) == 4 and floored["mean_weight_bits"] <= 4.5
    assert allocate(table, weight_bits_avg=5.0)["layers"]["a"][0] == 8  # 4+4+4+8 = mean 5


# ---------------------------------------------------------------- --allocator greedy
def _fragile_for_weights() -> torch.nn.Module:
    """conv -> ReLU -> conv -> ReLU -> pool -> fc, where the second conv is fragile at low weight widths: every
    filter has a weight of 5 on input channel 0, which is always 0 (first conv's filter 0 is zero with bias -1), so
    the float output ignores it; it sets each filter's grid step and the live weights (~0.1) round to 0. Its twin
    (a third conv of the same size) is ordinary."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    with torch.no_grad():
        net[0].weight[0].zero_()
        net[0].bias[0] = -1.0
        net[2].weight[:, 0] = 5.0
    return net


def test_greedy_raises_the_fragile_layer_and_keeps_the_budget():
    from qexport.mixed.greedy import greedy_allocation
    from qexport.models import fold_batchnorm

    folded = fold_batchnorm(_fragile_for_weights())
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    numel = {n: m.weight.numel() for n, m in folded.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    budget = 4 * sum(numel.values()) + 4 * numel["2"]  # room to raise one of the two big convs to 8 bits
    res = greedy_allocation(folded, "onnxruntime", x, budget, widths=(4, 6, 8), quiet=True)
    raised = [r["layer"] for r in res["rounds"]]
    assert res["widths"]["2"] > 4 and raised.index("2") < (raised.index("4") if "4" in raised else len(raised)), raised
    assert sum(numel[n] * w for n, w in res["widths"].items()) <= budget
    losses = [r["loss"] for r in res["rounds"]]
    assert losses == sorted(losses, reverse=True) and res["loss"] == pytest.approx(losses[-1], rel=1e-5)


def test_bits_auto_greedy_end_to_end_and_its_bad_inputs(tmp_path, tiny_images, qx):
    out = tmp_path / "g"
    res = qx("calibrate", TINY, "--bits", "auto", "--weight-bits-avg", "5.5", "--allocator", "greedy", "--data",
             tiny_images, "--num-samples", "16", "--method", "mse", "-q", "-o", out)
    assert res.code == 0, res.err
    rec = QuantRecipe.load(out)
    numels = {n: int(t.numel()) for n, t in rec.int_weights.items()}
    assert 5.0 < mean_weight_bits(rec.plan, numels) <= 5.5
    mp = rec.metrics["mixed_precision"]
    assert mp["allocator"] == "greedy" and mp["rounds"] and mp["candidate_widths"] == [5, 6, 7, 8]
    assert {lp.name: f"w{lp.weight.bits}a8" for lp in rec.plan.layers} == mp["layers"]
    for args, frag in [(["--allocator", "greedy", "--act-bits-avg", "6"], "weight widths only"),
                       (["--allocator", "best", "--weight-bits-avg", "5"], "--allocator 'best'"),
                       (["--allocator", "greedy", "--weight-bits-avg", "0.5"], "--weight-bits-avg must be in 1..8")]:
        bad = tmp_path / "bad"
        res = qx("calibrate", TINY, "--bits", "auto", "--data", tiny_images, "--num-samples", "16", "-q", "-o", bad,
                 *args)
        assert_user_error(res, frag)
        assert not bad.exists()


# ---------------------------------------------------------------- --allocator labels
def test_label_allocator_raises_the_fragile_layer_and_reports_the_true_cross_entropy():
    import torch.nn.functional as F

    from qexport.mixed.greedy import fake_quantized_weights, greedy_allocation
    from qexport.models import fold_batchnorm

    net = _fragile_for_weights()
    with torch.no_grad():
        net[-1].weight.mul_(30.0)  # confident logits, so that what a layer's rounding flips shows in the loss
    folded = fold_batchnorm(net)
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = folded(x).argmax(1)  # the float model is right on every image: the fragile layer costs the most
    numel = {n: m.weight.numel() for n, m in folded.named_modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    budget = 4 * sum(numel.values()) + 4 * numel["2"]
    res = greedy_allocation(folded, "onnxruntime", x, budget, widths=(4, 6, 8), labels=y, quiet=True)
    raised = [r["layer"] for r in res["rounds"]]
    assert res["widths"]["2"] > 4 and raised.index("2") < (raised.index("4") if "4" in raised else len(raised)), raised
    # The reported loss is the cross-entropy of the model with the chosen widths, measured here independently.
    weights = fake_quantized_weights(folded, "onnxruntime", (4, 6, 8), ())
    with torch.no_grad():
        for n, w in res["widths"].items():
            folded.get_submodule(n).weight.copy_(weights[w][n])
        ce = float(F.cross_entropy(folded(x).double(), y))
    assert res["loss"] == pytest.approx(ce, rel=1e-6)


def test_bits_auto_labels_end_to_end_and_its_bad_inputs(tmp_path, tiny_images, qx):
    out = tmp_path / "l"
    res = qx("calibrate", TINY, "--bits", "auto", "--weight-bits-avg", "5.5", "--allocator", "labels", "--data",
             tiny_images, "--num-samples", "8", "--heldout-images", "12", "--method", "mse", "-q", "-o", out)
    assert res.code == 0, res.err
    rec = QuantRecipe.load(out)
    mp = rec.metrics["mixed_precision"]
    assert mp["allocator"] == "labels" and mp["measured_on"] == "12 held-out labelled images"
    numels = {n: int(t.numel()) for n, t in rec.int_weights.items()}
    assert mean_weight_bits(rec.plan, numels) <= 5.5
    assert {lp.name: f"w{lp.weight.bits}a8" for lp in rec.plan.layers} == mp["layers"]
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(Path(tiny_images).rglob("*.png")):
        (flat / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    for data, args, frag in [
            (tiny_images, ["--heldout-images", "17"], "--heldout-images 17 needs that many labelled images outside "
                                                      "the 8 calibration images"),
            (flat, [], "and no class subfolders"),
            (tiny_images, ["--allocator", "greedy", "--heldout-images", "4"],
             "--heldout-images goes with --allocator labels"),
            (tiny_images, ["--heldout-images", "0"], "--heldout-images must be positive")]:
        bad = tmp_path / "bad"
        allocator = [] if "--allocator" in args else ["--allocator", "labels"]
        res = qx("calibrate", TINY, "--bits", "auto", "--weight-bits-avg", "5.5", "--data", data, "--num-samples", "8",
                 "-q", "-o", bad, *allocator, *args)
        assert_user_error(res, frag)
        assert not bad.exists()


def test_no_floor_lets_the_label_allocator_go_one_bit_below_at_an_equal_size(tmp_path, tiny_images, qx):
    from qexport.mixed.greedy import candidate_widths

    assert candidate_widths(4.0) == (4, 5, 6, 8) and candidate_widths(4.0, floor=False) == (3, 4, 5, 6, 8)
    assert candidate_widths(1.5, floor=False) == (1, 2, 3, 8)
    out = tmp_path / "nf"
    res = qx("calibrate", TINY, "--bits", "auto", "--weight-bits-avg", "5", "--allocator", "labels", "--no-floor",
             "--data", tiny_images, "--num-samples", "8", "--heldout-images", "12", "--method", "mse", "-q", "-o", out)
    assert res.code == 0, res.err
    rec = QuantRecipe.load(out)
    assert rec.metrics["mixed_precision"]["candidate_widths"] == [4, 5, 6, 7, 8]
    numels = {n: int(t.numel()) for n, t in rec.int_weights.items()}
    assert mean_weight_bits(rec.plan, numels) <= 5.0
    res = qx("calibrate", TINY, "--bits", "w4a8", "--no-floor", "--data", tiny_images, "-q", "-o", tmp_path / "bad")
    assert_user_error(res, "go with --bits auto")


def test_label_allocator_images_are_outside_the_calibration_subset(tiny_images):
    """The held-out images come from the permutation calibrate's subset is drawn from: none of them is calibrated on."""
    from qexport.data import ImageFolder, load_tensor
    from qexport.mixed.sensitivity_run import load_calibration, load_heldout
    from qexport.models import load_model

    pre = load_model(TINY).preprocess
    folder = ImageFolder(tiny_images, pre)
    calib, _ = load_tensor(folder, num_samples=8, seed=3)
    held, held_y = load_heldout(folder, 8, 3, 12, quiet=True)
    assert len(held) == 12 and (held_y >= 0).all()
    x, _, (held2, _) = load_calibration(folder, 8, 3, heldout=12, quiet=True)  # the sensitivity command's path
    assert torch.equal(x, calib) and torch.equal(held2, held)

    def images(t: torch.Tensor) -> set:
        return {tuple(v.flatten().tolist()) for v in t}

    assert len(images(calib)) == 8 and len(images(held)) == 12 and not images(calib) & images(held)
