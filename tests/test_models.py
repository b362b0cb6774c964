"""qexport.models: real CIFAR checkpoints, bad weights files, BN folding, torch.export round trip, digits demo."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn

from qexport.errors import QexportError
from qexport.models import (
    Preprocess,
    fold_batchnorm,
    get,
    list_models,
    load_model,
    register_model,
    sha256_file,
)

@pytest.fixture(scope="module")
def r20(r20_weights):
    return load_model("cifar:resnet20", str(r20_weights))


class Unsafe:
    """A custom class: pickling it makes torch.load(weights_only=True) refuse the file."""

    def __init__(self):
        self.w = torch.zeros(2)


def test_registry_lists_families():
    cifar = list_models("cifar:*")
    assert cifar == ["cifar:resnet20", "cifar:resnet32", "cifar:resnet44", "cifar:resnet56"]
    assert "torchvision:resnet18" in list_models("torchvision:*")
    assert get("cifar").name == "cifar"
    with pytest.raises(QexportError, match="known families"):
        get("nope")


def test_register_model_decorator():
    @register_model("tinytest", names=["one"])
    def build(name, num_classes=None):
        return nn.Linear(4, 2), Preprocess((2, 2), (0.5,), (0.5,), channels=1), 2

    lm = load_model("tinytest:one")
    assert isinstance(lm.model, nn.Linear) and lm.input_shape == (1, 2, 2) and lm.num_classes == 2
    assert "tinytest:one" in list_models()


def test_preprocess_round_trip_and_overrides():
    p = Preprocess((224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), resize=256)
    assert Preprocess.from_dict(p.to_dict()) == p
    q = p.with_overrides(input_size=(112, 112))
    assert q.input_size == (112, 112) and q.resize == 128
    g = p.with_overrides(mean=(0.5,), std=(0.25,))
    assert g.channels == 1
    with pytest.raises(QexportError, match="one per channel"):
        Preprocess((8, 8), (0.5, 0.5), (0.5, 0.5), channels=3)


def test_cifar_architecture_matches_checkpoint_keys(r20_weights):
    from qexport.models.weights import read_state_dict

    sd = read_state_dict(r20_weights)
    model = load_model("cifar:resnet20").model
    own = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert own == set(sd)
    assert sum(p.numel() for p in model.parameters()) == 269_722
    torch.fx.symbolic_trace(model)  # option-A shortcut is a module, not a lambda


def test_resnet20_real_weights_accuracy(r20, r20_weights, cifar_test):
    from qexport.data import load_tensor

    assert r20.weights_sha256.startswith("12fca82f") and r20.weights_sha256 == sha256_file(r20_weights)
    assert r20.input_shape == (3, 32, 32) and r20.num_classes == 10 and not r20.model.training
    assert r20.preprocess.resize is None
    x, y = load_tensor(cifar_test, r20.preprocess, num_samples=500, seed=0)
    with torch.no_grad():
        acc = (r20.model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.75, acc  # README: 81.02% on all 5000 test-dev images


def test_safetensors_and_plain_state_dict(r20, tmp_path):
    from safetensors.torch import save_file

    x = torch.randn(4, 3, 32, 32)
    ref = r20.model(x)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in r20.model.state_dict().items()}, str(st))
    plain = tmp_path / "plain.pt"
    torch.save({"model": {"module." + k: v for k, v in r20.model.state_dict().items()}}, plain)
    for path in (st, plain):
        lm = load_model("cifar:resnet20", str(path))
        assert torch.equal(lm.model(x), ref)


@pytest.mark.parametrize(
    "make, words",
    [
        ("missing", "not found"),
        ("truncated", "corrupt"),
        ("junk", "corrupt"),
        ("bad_safetensors", "not a valid safetensors"),
        ("unsafe", "arbitrary code execution"),
        ("list", "not a dict of tensors"),
        ("mixed", "not a dict of tensors"),
        ("wrong_keys", "missing keys: "),
        ("wrong_shape", "shape mismatches"),
    ],
)
def test_bad_weights_files(make, words, tmp_path):
    # a real resnet20 state dict layout, saved the way the published checkpoints are (module. prefix, nested)
    sd = {"module." + k: v for k, v in load_model("cifar:resnet20").model.state_dict().items()}
    p = tmp_path / f"{make}.pt"
    if make == "missing":
        pass
    elif make == "truncated":
        torch.save({"state_dict": sd, "best_prec1": 91.0}, p)
        p.write_bytes(p.read_bytes()[:5000])
    elif make == "junk":
        p.write_bytes(b"this is not a checkpoint at all")
    elif make == "bad_safetensors":
        p = tmp_path / "bad.safetensors"
        p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    elif make == "unsafe":
        torch.save({"state_dict": sd, "extra": Unsafe()}, p)
    elif make == "list":
        torch.save([1, 2, 3], p)
    elif make == "mixed":
        torch.save({"conv1.weight": torch.zeros(1), "note": "hello"}, p)
    elif make == "wrong_keys":
        torch.save({k.replace("layer1", "stage1"): v for k, v in sd.items()}, p)
    elif make == "wrong_shape":
        torch.save({**sd, "module.linear.weight": torch.zeros(100, 64)}, p)
    with pytest.raises(QexportError) as e:
        load_model("cifar:resnet20", str(p))
    msg = str(e.value)
    assert words in msg and "\n" not in msg, msg
    if make == "wrong_keys":
        assert "layer1.0.conv1.weight" in msg and "unexpected keys: stage1.0.conv1.weight" in msg
    if make == "wrong_shape":
        assert "linear.weight (100, 64) vs (10, 64)" in msg


def test_pickle_of_custom_object_is_not_executed(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump(Unsafe(), f)
    with pytest.raises(QexportError, match="weights_only=True"):
        load_model("cifar:resnet20", str(p))


@pytest.mark.parametrize(
    "spec, words",
    [
        ("nofamily:resnet20", "no model family 'nofamily'"),
        ("cifar:resnet99", "unknown CIFAR model"),
        ("torchvision:resnet1888", "unknown torchvision classification model"),
        ("qexport.models.preprocess:IMAGENET_MEAN", "not callable"),
        ("qexport.models.preprocess:nothing", "has no attribute"),
        ("qexport.models.preprocess:Preprocess", "calling factory"),
        ("collections:OrderedDict", "not a torch.nn.Module"),
        ("resnet20", "unknown model spec"),
        ("/nonexistent/model.pt2", "not found"),
    ],
)
def test_bad_specs(spec, words):
    with pytest.raises(QexportError, match=words):
        load_model(spec)


def test_garbage_pt2_one_line_no_traceback(tmp_path, tiny_images):
    """torch.export.load logs a traceback for a bad archive before qexport's one-line error: it is silenced."""
    from conftest import assert_user_error, run_qexport

    bad = tmp_path / "garbage.pt2"
    bad.write_bytes(b"not a zip archive" * 8)
    res = run_qexport(["calibrate", bad, "--method", "minmax", "--data", tiny_images, "-o", tmp_path / "r", "-q"])
    assert "Traceback" not in res.err and "Ran into the following error" not in res.err, res.err
    assert_user_error(res, "garbage.pt2", "torch.export program")


def test_torchvision_and_factory_specs():
    lm = load_model("torchvision:resnet18", num_classes=7)
    assert lm.num_classes == 7 and lm.preprocess.resize == 256 and lm.input_shape == (3, 224, 224)
    assert lm.weights is None
    lm = load_model("torch.nn:Identity", input_size=64, mean=(0.1, 0.2, 0.3))
    assert lm.input_shape == (3, 64, 64) and lm.preprocess.mean == (0.1, 0.2, 0.3) and lm.num_classes is None


def test_fold_batchnorm_equal_outputs(r20):
    folded = fold_batchnorm(r20.model)
    assert isinstance(folded, torch.fx.GraphModule)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert isinstance(folded.get_submodule("layer1.0.conv1"), nn.Conv2d)
    assert any(isinstance(m, nn.BatchNorm2d) for m in r20.model.modules())  # original untouched
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        assert (folded(x) - r20.model(x)).abs().max().item() < 1e-4


def test_fold_batchnorm_names_untraceable_module():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.odd = Branchy()

        def forward(self, x):
            return self.odd(self.conv(x))

    with pytest.raises(QexportError, match="module 'odd' \\(Branchy\\)"):
        fold_batchnorm(Net().eval())


def test_pt2_round_trip(r20, r20_weights, tmp_path):
    ep = torch.export.export(r20.model, (torch.randn(1, 3, 32, 32),))
    path = tmp_path / "r20.pt2"
    torch.export.save(ep, str(path))
    lm = load_model(str(path))
    assert lm.input_shape == (3, 32, 32) and lm.num_classes == 10
    convs = [n for n, m in lm.model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and "layer1.0.conv1" in convs
    assert isinstance(lm.model.get_submodule("linear"), nn.Linear)
    x = torch.randn(8, 3, 32, 32)  # exported at batch 1, run at batch 8
    with torch.no_grad():
        ref = r20.model(x)
        assert (lm.model(x) - ref).abs().max().item() < 1e-5
        folded = fold_batchnorm(lm.model)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        assert (folded(x) - ref).abs().max().item() < 1e-4
    # the converted module's state dict has the original names, so --weights applies to it too
    lm2 = load_model(str(path), str(r20_weights))
    with torch.no_grad():
        assert (lm2.model(x) - ref).abs().max().item() < 1e-5


def test_digits_demo(tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn not installed (pip install 'qexport[demo]')")
    import time

    from qexport.data import ImageFolder, load_tensor
    from qexport.zoo.digits import prepare_digits

    t = time.time()
    r = prepare_digits(tmp_path)
    assert time.time() - t < 40
    assert r["accuracy"] >= 0.95
    t = time.time()
    assert prepare_digits(tmp_path) == r and time.time() - t < 1  # cached
    lm = load_model(r["spec"], r["weights"])
    assert lm.input_shape == (1, 16, 16) and lm.num_classes == 10
    ds = ImageFolder(r["test"], lm.preprocess)
    assert ds.classes == [str(i) for i in range(10)] and len(ds) == 359
    x, y = load_tensor(ds)
    with torch.no_grad():
        acc = (lm.model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(r["accuracy"])
    folded = fold_batchnorm(lm.model)
    with torch.no_grad():
        assert (folded(x) - lm.model(x)).abs().max().item() < 1e-4
