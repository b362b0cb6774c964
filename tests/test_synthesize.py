"""Synthesis (bns / mixmix) and --method mixmix on tiny models: BN loss falls, no real image is read, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_user_error, run_in_fresh_process, sigint_at_step
from qexport.data.synthesize import SynthConfig
from qexport.training.synthesis_run import synthesize_folder
from qexport.errors import QexportError

TINY = "tests_support.models:tiny_net"
NO_BN = "tests_support.models:convtranspose_net"


@pytest.fixture
def no_real_images(monkeypatch):
    """Any attempt to open an image file or an image folder fails the test."""
    import PIL.Image

    import qexport.data.folder as folder

    def refuse(*a, **k):
        raise AssertionError("synthesis opened a real image")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    monkeypatch.setattr(folder.ImageFolder, "__init__", refuse)


@pytest.mark.parametrize("mode,zoo", [("bns", ()), ("mixmix", (TINY,))])
def test_synthesis_lowers_bn_loss_reads_nothing_and_writes_a_folder(tmp_path, no_real_images, mode, zoo):
    cfg = SynthConfig(mode=mode, num_images=16, iters=25, batch_size=8)
    out = synthesize_folder(TINY, None, zoo, cfg, tmp_path / "imgs", seed=3, device="cpu", quiet=True)
    info = json.loads((out / "synthesis.json").read_text())
    assert len(info["batches"]) == 2 and info["real_images_read"] == 0
    for b in info["batches"]:
        assert b["bn_last"] < 0.5 * b["bn_first"]
    assert len(info["zoo"]) == (1 if mode == "bns" else 2)
    pngs = sorted(out.glob("*/*.png"))
    assert len(pngs) == 16 and {p.parent.name for p in pngs} == {"0", "1", "2", "3"}
    assert len(list(out.glob("contact_*.png"))) == 4
    assert not (tmp_path / ".imgs.work").exists()


def test_synthesis_is_deterministic_and_resumes(tmp_path):
    from qexport.training.synthesis_run import load_zoo, run_synthesis
    from qexport.models import load_model

    cfg = SynthConfig(mode="mixmix", num_images=8, iters=6, batch_size=4)
    m = load_model(TINY, None)
    zoo = load_zoo(m, TINY, [], "cpu")
    a, la, _ = run_synthesis(zoo, 4, cfg, 1, None, False, True)
    work = tmp_path / "w"
    work.mkdir()
    b1, _, _ = run_synthesis(zoo, 4, cfg, 1, work, False, True)
    state = torch.load(work / "synthesis.pt", weights_only=False)
    state["images"], state["batches"] = state["images"][:1], state["batches"][:1]  # as if stopped after batch 1
    torch.save(state, work / "synthesis.pt")
    b2, lb, _ = run_synthesis(zoo, 4, cfg, 1, work, True, True)
    assert torch.equal(a, b1) and torch.equal(a, b2) and torch.equal(la, lb)


def _interrupted_synthesis(work: Path, stop_at: int) -> None:
    """The interrupted run of the next test, in a fresh process: a real SIGINT during step ``stop_at``."""
    from qexport.data import synthesize
    from qexport.models import load_model
    from qexport.training.synthesis_run import load_zoo, run_synthesis

    count = sigint_at_step(synthesize.SynthesisBatch, stop_at)
    zoo = load_zoo(load_model(TINY, None), TINY, [], "cpu")
    try:
        run_synthesis(zoo, 4, CTRL_C_CFG, 1, work, False, True)
    except KeyboardInterrupt:
        print(f"interrupted steps={count['started']} done={count['finished']}")


CTRL_C_CFG = SynthConfig(mode="mixmix", num_images=8, iters=6, batch_size=4)


def test_ctrl_c_mid_batch_finishes_the_step_then_resumes_identically(tmp_path):
    """Batches run on the shared training loop: a SIGINT in batch 2 lets the step under way finish, raises
    KeyboardInterrupt with batch 1 in the checkpoint; --resume gives the images of an uninterrupted run. The
    interrupted run is a fresh process (see conftest.run_in_fresh_process)."""
    from qexport.models import load_model
    from qexport.training.synthesis_run import load_zoo, run_synthesis

    zoo = load_zoo(load_model(TINY, None), TINY, [], "cpu")
    ref, _, _ = run_synthesis(zoo, 4, CTRL_C_CFG, 1, None, False, True)
    work = tmp_path / "w"
    work.mkdir()
    stop_at = CTRL_C_CFG.iters + 3
    res = run_in_fresh_process(Path(__file__), "_interrupted_synthesis", work, stop_at)
    assert f"interrupted steps={stop_at} done={stop_at}" in res.stdout, res.stdout + res.stderr[-2000:]
    assert len(torch.load(work / "synthesis.pt", weights_only=False)["batches"]) == 1
    resumed, _, _ = run_synthesis(zoo, 4, CTRL_C_CFG, 1, work, True, True)
    assert torch.equal(ref, resumed)


def test_the_images_feed_brecq(tmp_path, qx):
    out = synthesize_folder(TINY, None, (), SynthConfig(mode="bns", num_images=16, iters=5, batch_size=16),
                            tmp_path / "syn", device="cpu", quiet=True)
    res = qx("calibrate", TINY, "--method", "brecq", "--bits", "w4a4", "--data", out, "--num-samples", "16",
             "--time-budget", "2s", "-q", "-o", tmp_path / "recipe")
    assert res.code == 0, res.err


def test_zoo_per_step_runs_one_random_model_per_step_and_still_lowers_the_bn_loss():
    from qexport.data.synthesize import make_member, synthesize_batch
    from qexport.models import load_model

    m = load_model(TINY, None)
    zoo = [make_member(f"tiny{i}", load_model(TINY, None).model, m.preprocess, "cpu") for i in range(2)]
    calls = [0, 0]
    for i, member in enumerate(zoo):
        member.model.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    cfg = SynthConfig(mode="mixmix", num_images=8, iters=30, batch_size=8, zoo_per_step=1)
    labels = torch.arange(8) % 4
    pix, info = synthesize_batch(zoo, labels, m.preprocess.input_shape[1:], cfg, torch.Generator().manual_seed(0),
                                 30, 4)
    assert sum(calls) == 30 and min(calls) >= 5  # one model per step, both drawn
    assert info["bn_last"] < 0.5 * info["bn_first"]
    every, _ = synthesize_batch(zoo, labels, m.preprocess.input_shape[1:], SynthConfig(num_images=8, iters=30,
                                batch_size=8), torch.Generator().manual_seed(0), 30, 4)
    assert sum(calls) == 30 + 60 and not torch.equal(pix, every)


@pytest.mark.parametrize("args,fragment", [
    (["--zoo", "cifar:resnet20"], "classes"),
    (["--mode", "bns", "--zoo", TINY], "alone"),
    (["--iters", "0"], "--iters"),
    (["--num-images", "0"], "--num-images"),
    (["--mode", "dream"], "--mode"),
    (["--zoo-per-step", "-1"], "zoo_per_step"),
    (["--zoo", "tests_support.models:tiny_net=missing.pt"], "no such weights"),
])
def test_bad_synthesis_input(qx, tmp_path, args, fragment):
    out = tmp_path / "imgs"
    res = qx("synthesize", TINY, *args, "-q", "-o", out)
    assert_user_error(res, fragment)
    assert not out.exists()


def test_model_without_batchnorm_is_refused(qx, tmp_path):
    res = qx("synthesize", NO_BN, "--mode", "bns", "-q", "-o", tmp_path / "imgs")
    assert_user_error(res, "no BatchNorm", "BN-statistics loss")
    assert not (tmp_path / "imgs").exists()


def test_empty_zoo_folder_is_refused(qx, tmp_path):
    (tmp_path / "zoo").mkdir()
    res = qx("synthesize", TINY, "--zoo", tmp_path / "zoo", "-q", "-o", tmp_path / "imgs")
    assert_user_error(res, "holds no models", "zoo.txt")
    assert not (tmp_path / "imgs").exists()


def test_method_mixmix_is_data_free_and_keeps_the_images(tmp_path, no_real_images):
    from qexport.calibrate import CalibrateConfig, calibrate

    out = calibrate(CalibrateConfig(model=TINY, output=tmp_path / "recipe", method="mixmix", bits="w4a4",
                                    quiet=True, options={"num_images": 16, "synth_iters": 10, "synth_batch_size": 8,
                                                         "iters": 20, "act_iters": 5, "zoo": (TINY,)}))
    assert len(list((out / "synthetic").glob("*/*.png"))) == 16
    rec = json.loads((out / "recipe.json").read_text())
    assert rec["provenance"]["method"] == "mixmix" and rec["provenance"]["num_samples"] == 0


def test_method_mixmix_refuses_data_and_bad_options(tmp_path):
    with pytest.raises(QexportError, match="synth-share"):
        from qexport.calibrators.mixmix import MixMixConfig

        MixMixConfig(synth_share=1.5)
    with pytest.raises(QexportError, match="--iters"):
        MixMixConfig(iters=0)
