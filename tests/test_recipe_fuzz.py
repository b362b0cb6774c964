"""Recipe and engine folders are validated on load: mutated ones never end in a Python traceback.

Each case copies a good folder, changes one thing (tests_support/fuzz.py: a JSON key removed or given a value of
another type, NaN, a negative, an empty container; a tensor removed, retyped, reshaped, emptied or NaN; a file
truncated) and runs the real command in this process: ``qexport export`` on a mutated recipe, ``qexport verify``
on a mutated engine folder. Every run must succeed, fail a check (exit 1), or stop with exit 2 and one ``error:``
line; an exception escaping ``qexport.cli.main`` is a traceback. The default suite runs a few hundred seeded
cases; the slow test 1,000 of each kind (``pytest -m slow tests/test_recipe_fuzz.py``).
"""

from __future__ import annotations

import random

import pytest

from tests_support.fuzz import clean_failure, mutate_engine, mutate_recipe, run_cli


@pytest.fixture(scope="module")
def tiny_engine_folder(tmp_path_factory, tiny_recipe):
    from qexport.build_engine import build_engine_folder
    from qexport.export.qdq import export_recipe

    root = tmp_path_factory.mktemp("fuzz_engine")
    qdq, _, _ = export_recipe(tiny_recipe, "onnxruntime", root / "m.onnx")
    return build_engine_folder(qdq, root / "engine", "onnxruntime", threads=1)


def _fuzz_recipes(good, root, n: int, seed: int) -> list[str]:
    rng, bad, codes = random.Random(seed), [], set()
    for i in range(n):
        what = mutate_recipe(good, root / f"m{i}", rng)
        out = run_cli(["export", root / f"m{i}", "-o", root / f"o{i}" / "m.onnx"])
        codes.add(out.code)
        if not clean_failure(out):
            bad.append(f"{what}: {(out.traceback or out.stderr).strip().splitlines()[-1]}")
    assert {0, 2} <= codes  # some mutants are harmless (exported), most are refused
    return bad


def _fuzz_engines(good, recipe, images, root, n: int, seed: int) -> list[str]:
    rng, bad = random.Random(seed), []
    for i in range(n):
        what = mutate_engine(good, root / f"e{i}", rng)
        out = run_cli(["verify", root / f"e{i}", "--recipe", recipe, "--data", images, "--bench-batch", 0, "-q",
                       "--report", root / f"r{i}"])
        if not clean_failure(out):
            bad.append(f"{what}: {(out.traceback or out.stderr).strip().splitlines()[-1]}")
    return bad


def test_mutated_recipes_no_traceback(tmp_path, tiny_recipe):
    bad = _fuzz_recipes(tiny_recipe, tmp_path, 150, seed=0)
    assert bad == []


def test_mutated_engines_no_traceback(tmp_path, tiny_engine_folder, tiny_recipe, tiny_images):
    bad = _fuzz_engines(tiny_engine_folder, tiny_recipe, tiny_images, tmp_path, 80, seed=0)
    assert bad == []


def test_errors_name_the_field(tmp_path, tiny_recipe, qx):
    import json
    import shutil

    from conftest import assert_user_error

    cases = {("model", "spec"): (None, "model.spec is missing"),
             ("act_scales", "x"): ({"a": 1}, "act_scales.x must be"),
             ("plan", "layers"): ("conv1", "plan.layers must be a list")}
    for (top, key), (value, fragment) in cases.items():
        d = tmp_path / f"{top}_{key}"
        shutil.copytree(tiny_recipe, d)
        meta = json.loads((d / "recipe.json").read_text())
        if value is None:
            del meta[top][key]
        elif top == "plan":
            meta[top][key] = value
        else:
            meta[top][next(iter(meta[top]))] = value
        (d / "recipe.json").write_text(json.dumps(meta))
        res = qx("export", d, "-o", tmp_path / f"{top}.onnx")
        assert_user_error(res, fragment.replace(".x ", f".{next(iter(meta[top]))} ") if key == "x" else fragment)


@pytest.mark.slow
def test_thousand_mutations_each_no_traceback(tmp_path, tiny_recipe, tiny_engine_folder, tiny_images):
    """The acceptance figure: 0 tracebacks over 1,000 recipe and 1,000 engine mutations."""
    (tmp_path / "r").mkdir()
    (tmp_path / "e").mkdir()
    bad = _fuzz_recipes(tiny_recipe, tmp_path / "r", 1000, seed=1)
    bad += _fuzz_engines(tiny_engine_folder, tiny_recipe, tiny_images, tmp_path / "e", 1000, seed=1)
    assert bad == [], f"{len(bad)} tracebacks in 2,000 mutations, e.g. {bad[:3]}"
