"""``qexport corrupt``: seeded corrupted copies (a shifted test set), and ``verify`` over several folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, tree
from qexport.data.corrupt import CORRUPTIONS, corrupt_image, expand_data_folders


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int64)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A smooth 16x16 image with an edge (blur, contrast and JPEG all have something to change)."""
    y, x = np.mgrid[0:16, 0:16]
    img = np.stack([x * 12, y * 10, ((x > 7) * 180 + 30)], axis=-1)
    return img.astype(np.uint8)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_is_seeded_and_grows_with_severity(photo, name):
    a = corrupt_image(photo, name, 3, seed=0, index=5)
    assert a.dtype == np.uint8 and a.shape == photo.shape
    assert np.array_equal(a, corrupt_image(photo, name, 3, seed=0, index=5))  # deterministic
    change = [np.abs(corrupt_image(photo, name, s, 0, 5).astype(int) - photo).mean() for s in (1, 3, 5)]
    assert 0 < change[0] < change[1] < change[2], change
    if name == "gaussian_noise":
        assert not np.array_equal(a, corrupt_image(photo, name, 3, seed=1, index=5))  # the seed matters


def test_cli_writes_labelled_folders_and_json(tmp_path, tiny_images, qx):
    out = tmp_path / "shifted"
    res = qx("corrupt", tiny_images, "-o", out, "--severities", "1,5", "--num-samples", 10, "-q")
    assert res.code == 0, res.err
    meta = json.loads((out / "corruptions.json").read_text())
    assert meta["seed"] == 0 and meta["images"] == 10 and len(meta["folders"]) == 10
    assert {f["folder"] for f in meta["folders"]} == {f"{c}-{s}" for c in CORRUPTIONS for s in (1, 5)}
    for f in meta["folders"]:
        files = sorted((out / f["folder"]).rglob("*.png"))
        assert len(files) == 10 and {p.parent.name for p in files} <= {"c0", "c1"}
    # the same command regenerates the same pixels; a subset of corruptions gives the same images
    again = tmp_path / "again"
    assert qx("corrupt", tiny_images, "-o", again, "--severities", "5", "--corruptions", "gaussian_noise",
              "--num-samples", 10, "-q").code == 0
    for p in (again / "gaussian_noise-5").rglob("*.png"):
        assert np.array_equal(_pixels(p), _pixels(out / "gaussian_noise-5" / p.relative_to(again / "gaussian_noise-5")))
    assert expand_data_folders([tiny_images, out])[1:] == [out / f["folder"] for f in meta["folders"]]


@pytest.mark.parametrize("args, fragment", [
    (["--severities", "0"], "severities"),
    (["--severities", "two"], "severities"),
    (["--corruptions", "fog"], "fog"),
    (["--num-samples", "0"], "num-samples"),
])
def test_cli_bad_options_write_nothing(tmp_path, tiny_images, qx, args, fragment):
    res = qx("corrupt", tiny_images, "-o", tmp_path / "out", *args, "-q")
    assert_user_error(res, fragment)
    assert tree(tmp_path) == set()


def test_cli_refuses_existing_output_and_unlabelled_folder(tmp_path, tiny_images, qx):
    (tmp_path / "out").mkdir()
    assert_user_error(qx("corrupt", tiny_images, "-o", tmp_path / "out", "-q"), "--force")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(flat / "a.png")
    assert_user_error(qx("corrupt", flat, "-o", tmp_path / "o2", "-q"), "class subfolders")
    assert not (tmp_path / "o2").exists()


def test_verify_reports_every_data_folder(tmp_path, tiny_recipe, tiny_images, qx):
    shifted = tmp_path / "shifted"
    assert qx("corrupt", tiny_images, "-o", shifted, "--corruptions", "gaussian_noise,contrast", "-q").code == 0
    onnx_file, engine = tmp_path / "m.onnx", tmp_path / "engine"
    assert qx("export", tiny_recipe, "-o", onnx_file).code == 0
    assert qx("build-engine", onnx_file, "-o", engine).code == 0
    res = qx("verify", engine, "--recipe", tiny_recipe, "--data", tiny_images, "--data", shifted,
             "--bench-batch", 0, "--min-agreement", 0, "--report", tmp_path / "rep", "-q")
    assert res.code == 0, res.err
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    paths = [d["path"] for d in rep["data_sets"]]
    assert paths == [str(tiny_images), str(shifted / "gaussian_noise-3"), str(shifted / "contrast-3")]
    rows = [d["accuracy"]["engine_top1"] for d in rep["data_sets"][1:]]
    assert rep["more_data_mean"]["engine_top1"] == pytest.approx(np.mean(rows))
    assert rep["data_sets"][0]["accuracy"] == rep["accuracy"]
    assert len([c for c in rep["checks"] if "agreement" in c["name"]]) == 3  # the gate holds on every folder
    assert "contrast-3" in (tmp_path / "rep" / "report.md").read_text() and "contrast-3" in res.out
