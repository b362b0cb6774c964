"""qexport.data: generated and real CIFAR JPEG folders, flat folders, bad images, seeded subsets, saved sets."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

from conftest import write_image_folder
from qexport.data import (
    ImageFolder,
    fingerprint,
    iter_batches,
    load_tensor,
    save_image_folder,
)
from qexport.errors import QexportError
from qexport.models import CIFAR_PRESET, IMAGENET_PRESET, Preprocess

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture()
def small(tmp_path):
    """3 classes x 4 generated 32x32 JPEGs (the data path needs no shared folder)."""
    return write_image_folder(tmp_path / "small", classes=("bird", "cat", "airplane"), per_class=4, size=32,
                              ext=".jpg")


def test_cifar_folder_labels_and_tensors(cifar_test):
    ds = ImageFolder(cifar_test, CIFAR_PRESET)
    assert ds.classes == CLASSES and len(ds) == 5000 and ds.labelled
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    assert ds.labels[-1] == 9 and ds.paths[-1].parent.name == "truck"
    # normalisation: [0,1] pixels -> (p - mean) / std
    lo = (0 - torch.tensor(CIFAR_PRESET.mean)) / torch.tensor(CIFAR_PRESET.std)
    assert (x.amin(dim=(1, 2)) >= lo - 1e-6).all()
    ds.validate(4)


def test_seeded_subset_is_deterministic(cifar_test):
    a = load_tensor(cifar_test, CIFAR_PRESET, num_samples=64, seed=3, batch_size=20)
    b = load_tensor(cifar_test, CIFAR_PRESET, num_samples=64, seed=3, batch_size=64)
    c = load_tensor(cifar_test, CIFAR_PRESET, num_samples=64, seed=4)
    assert a[0].shape == (64, 3, 32, 32) and a[1].dtype == torch.int64
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert len(set(a[1].tolist())) > 3  # a random subset, not the first class folder


def test_progress_and_all_images(small):
    calls = []
    x, y = load_tensor(small, CIFAR_PRESET, batch_size=5, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(5, 12), (10, 12), (12, 12)]
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # sorted classes: airplane, bird, cat
    assert load_tensor(small, CIFAR_PRESET, num_samples=100)[0].shape[0] == 12


def test_iter_batches(small):
    ds = ImageFolder(small, CIFAR_PRESET)
    batches = list(iter_batches(ds, 5))
    assert [len(b[1]) for b in batches] == [5, 5, 2]
    x, y = next(iter_batches(ds, 3, indices=[11, 0]))
    assert y.tolist() == [2, 0] and torch.equal(x[1], ds[0][0])


def test_flat_folder_is_unlabeled(small, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in sorted(small.rglob("*.jpg")):
        shutil.copy(f, flat / f"{f.parent.name}_{f.name}")
    (flat / "notes.txt").write_text("not an image")
    ds = ImageFolder(flat, CIFAR_PRESET)
    assert ds.classes == [] and not ds.labelled and len(ds) == 12
    x, y = load_tensor(ds)
    assert (y == -1).all() and x.shape == (12, 3, 32, 32)


def test_resize_and_crop_preset(small):
    x, _ = ImageFolder(small, IMAGENET_PRESET)[0]
    assert x.shape == (3, 224, 224)
    grey = Preprocess((28, 28), (0.5,), (0.5,), resize=28, channels=1)
    assert ImageFolder(small, grey)[0][0].shape == (1, 28, 28)


def test_fingerprint(small):
    ds = ImageFolder(small, CIFAR_PRESET)
    fp = ds.fingerprint()
    assert fp == fingerprint(ds.paths, small) == fingerprint(list(reversed(ds.paths)))
    with open(ds.paths[0], "ab") as f:
        f.write(b"\0")
    assert fingerprint(ds.paths, small) != fp


def test_folder_errors(tmp_path):
    with pytest.raises(QexportError, match="not found"):
        ImageFolder(tmp_path / "nope", CIFAR_PRESET)
    f = tmp_path / "file.jpg"
    f.write_bytes(b"x")
    with pytest.raises(QexportError, match="is not a folder"):
        ImageFolder(f, CIFAR_PRESET)
    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(QexportError, match="no images in .*jpg, jpeg, png, bmp, webp"):
        ImageFolder(empty, CIFAR_PRESET)


def test_corrupt_image_named(small):
    bad = small / "cat" / "zzz_broken.jpg"
    good = next((small / "cat").glob("*.jpg")).read_bytes()
    bad.write_bytes(good[:40])  # truncated JPEG
    ds = ImageFolder(small, CIFAR_PRESET)  # lazy: listing works
    with pytest.raises(QexportError, match="cannot read image .*zzz_broken.jpg"):
        load_tensor(ds)
    with pytest.raises(QexportError, match="zzz_broken.jpg"):
        ds.validate(sample_count=len(ds))


def test_wrong_size_image_named(small):
    Image.new("RGB", (40, 30), (10, 20, 30)).save(small / "bird" / "big.png")
    ds = ImageFolder(small, CIFAR_PRESET)
    idx = [str(p) for p in ds.paths].index(str(small / "bird" / "big.png"))
    with pytest.raises(QexportError, match=r"big.png is 40x30 .* takes 32x32 .*--input-size"):
        ds[idx]


def test_save_image_folder_round_trip(small, tmp_path):
    x, y = load_tensor(small, CIFAR_PRESET)
    out = save_image_folder(x, y, ["airplane", "bird", "cat"], CIFAR_PRESET, tmp_path / "syn")
    ds = ImageFolder(out, CIFAR_PRESET)
    assert ds.classes == ["airplane", "bird", "cat"] and len(ds) == 12
    x2, y2 = load_tensor(ds)
    assert torch.equal(y2, y)
    step = 0.5 / 255 / min(CIFAR_PRESET.std)
    assert (x2 - x).abs().max().item() <= step + 1e-5  # the JPEG pixels survive PNG exactly
    with pytest.raises(QexportError, match="already exists"):
        save_image_folder(x, y, ["airplane", "bird", "cat"], CIFAR_PRESET, out)
    # synthetic (out-of-range) grey images, unlabeled: clamped, flat
    grey = Preprocess((8, 8), (0.5,), (0.5,), channels=1)
    g = torch.randn(5, 1, 8, 8) * 3
    flat = save_image_folder(g, None, None, grey, tmp_path / "flat")
    xg, yg = load_tensor(flat, grey)
    assert (yg == -1).all() and xg.shape == (5, 1, 8, 8)
    assert (xg - g.clamp(-1, 1)).abs().max().item() <= 1 / 255 + 1e-5


def test_empty_class_folder_keeps_class_indices(small):
    (small / "bee").mkdir()  # sorts between "airplane" and "bird", holds no images
    ds = ImageFolder(small, CIFAR_PRESET)
    assert ds.classes == ["airplane", "bee", "bird", "cat"]
    assert sorted(set(ds.labels)) == [0, 2, 3]
