"""``qexport compare``: a 2x2x1 grid on the tiny net through the real pipeline, resumed after a cell is deleted
without recomputing the others; failing cells recorded; bad input is a one-line error."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import TINY, assert_user_error, tree


def _args(tiny_images, out, *extra):
    return ["compare", TINY, "--methods", "minmax,mse", "--bits", "w8a8,w4a4", "--targets", "onnxruntime",
            "--data", tiny_images, "--num-samples", "16", "--eval-data", tiny_images, "--threads", "1",
            "--bench-iters", "3", "--throughput-batch", "4", "-q", "-o", out, *extra]


def _mtimes(out):
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name in ("cell.json", "recipe.json")}


def test_compare_grid_runs_and_resumes_after_a_cell_is_deleted(tmp_path, tiny_images, qx):
    out = tmp_path / "cmp"
    res = qx(*_args(tiny_images, out))
    assert res.code == 0, res.err
    assert "4 of 4 cells ok (0 reused)" in res.out
    data = json.loads((out / "compare.json").read_text())
    rows = data["rows"]
    assert [(r["method"], r["bits"], r["target"]) for r in rows] == [
        ("minmax", "w8a8", "onnxruntime"), ("minmax", "w4a4", "onnxruntime"),
        ("mse", "w8a8", "onnxruntime"), ("mse", "w4a4", "onnxruntime")]
    name = data["eval"][0]
    for r in rows:
        assert r["status"] == "ok" and r["eval"][name]["agreement"] == 1.0
        assert r["latency_b1_ms"] > 0 and r["throughput_batch"] == 4 and r["speedup_b1"] > 0
    sizes = {r["bits"]: r["size_kb"] for r in rows}
    assert sizes["w4a4"] < sizes["w8a8"] < rows[0]["fp32_size_kb"]
    for f in ("compare.md", "accuracy_vs_width.png", "accuracy_vs_latency.png", "calibration_time.png"):
        assert (out / f).is_file(), f
    assert "| mse | w4a4 | onnxruntime |" in (out / "compare.md").read_text()

    before = _mtimes(out)
    gone = out / "cells" / "mse_w4a4_onnxruntime"
    shutil.rmtree(gone)
    res = qx(*_args(tiny_images, out))
    assert res.code == 0, res.err
    assert "4 of 4 cells ok (3 reused)" in res.out
    after = _mtimes(out)
    kept = {p: t for p, t in before.items() if gone not in p.parents}
    assert {p: after[p] for p in kept} == kept  # nothing else recomputed, recipes included
    assert (gone / "cell.json").is_file()
    again = json.loads((out / "compare.json").read_text())["rows"]
    assert again[3]["eval"][name] == rows[3]["eval"][name]  # the same recipe evaluated again: same figures


def test_failing_cell_is_recorded_and_the_rest_goes_on(tmp_path, tiny_images, qx):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: no failing runtime to record")
    except ImportError:
        pass
    out = tmp_path / "cmp"
    res = qx("compare", TINY, "--methods", "minmax", "--bits", "w8a8", "--targets", "onnxruntime,tensorrt",
             "--data", tiny_images, "--num-samples", "8", "--eval-data", tiny_images, "--eval-data", tiny_images,
             "--threads", "1", "--bench-iters", "2", "--throughput-batch", "2", "-q", "-o", out)
    assert res.code == 0, res.err
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "TensorRT" in rows[1]["reason"] and "\n" not in rows[1]["reason"]
    assert set(rows[0]["eval"]) == {tiny_images.name, tiny_images.name + "2"}  # one column group per folder
    assert "failed: TensorRT" in (out / "compare.md").read_text()


@pytest.mark.parametrize("extra,frag", [
    (["--opt", "gpfq.c=auto"], ["gpfq", "--methods does not list"]),
    (["--opt", "mse.c=2"], ["--method mse", "--c does not apply"]),
    (["--opt", "nodot=3"], ["METHOD.OPTION=VALUE"]),
    (["--bits", "w8a8,w9a8"], ["1..8"]),
    (["--targets", "tpu"], ["tpu", "unknown runtime"]),
    (["--methods", "nosuch"], ["unknown method 'nosuch'"]),
])
def test_compare_bad_input(tmp_path, tiny_images, qx, extra, frag):
    res = qx(*_args(tiny_images, tmp_path / "cmp"), *extra)
    assert_user_error(res, *frag)
    assert tree(tmp_path) == set()


def test_rerun_with_other_settings_is_refused(tmp_path, tiny_images, qx):
    out = tmp_path / "cmp"
    (out / "cells").mkdir(parents=True)
    (out / "settings.json").write_text(json.dumps({"model": TINY, "num_samples": 99}))
    res = qx(*_args(tiny_images, out))
    assert_user_error(res, "other settings", "num_samples", "--force")
