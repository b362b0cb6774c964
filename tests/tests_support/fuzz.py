"""Seeded mutations of recipe and engine folders, and a harness that feeds them to the ``qexport`` entry point.

A mutation changes one thing: a JSON key removed, a JSON value replaced by one of another type (or NaN, a
negative, an empty container), a tensor removed, given another dtype or shape, or emptied, a file truncated or
removed. :func:`run_cli` calls ``qexport.cli.main`` in this process and reports whether it ended in a Python
traceback (any exception other than the SystemExit of a handled error) or in anything but one ``error:`` line.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

_VALUES = [None, "x", "", 0, 1, -1, 7, 2.5, -0.5, 1e30, float("nan"), True, False, [], {}, [1, 2], {"a": 1},
           ["x"], [[1]]]


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON tree (the root excluded)."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list):
        items = enumerate(obj)
    else:
        return
    for k, v in items:
        yield prefix + (k,), v
        yield from _paths(v, prefix + (k,))


def _parent(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    return obj


def mutate_json(data: dict, rng: random.Random, skip: tuple[str, ...] = ()) -> str:
    """Change one thing in a JSON tree in place.

    Args:
        data: the tree.
        rng: seeded generator.
        skip: top-level keys whose subtrees are free text for people (not mutated).

    Returns:
        A description of the change.
    """
    paths = [p for p, _ in _paths(data) if p[0] not in skip]
    path = rng.choice(paths)
    parent = _parent(data, path)
    if rng.random() < 0.3:
        del parent[path[-1]] if isinstance(parent, dict) else parent.pop(path[-1])
        return f"removed {'.'.join(map(str, path))}"
    new = rng.choice(_VALUES)
    parent[path[-1]] = json.loads(json.dumps(new)) if new == new else new
    return f"{'.'.join(map(str, path))} = {new!r}"


def mutate_tensors(tensors: dict[str, torch.Tensor], rng: random.Random) -> str:
    """Change one tensor of a safetensors dict in place (remove, dtype, shape, empty).

    Args:
        tensors: name -> tensor.
        rng: seeded generator.

    Returns:
        A description of the change.
    """
    name = rng.choice(sorted(tensors))
    t = tensors[name]
    kind = rng.choice(["remove", "dtype", "shape", "empty", "flatten", "nan"])
    if kind == "remove":
        del tensors[name]
    elif kind == "dtype":
        dtype = rng.choice([torch.float16, torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool])
        tensors[name] = t.to(dtype)
    elif kind == "shape":
        tensors[name] = torch.cat([t, t[:1]]) if t.dim() and t.shape[0] else t.reshape(1, -1)
    elif kind == "empty":
        tensors[name] = t.flatten()[:0].clone()
    elif kind == "flatten":
        tensors[name] = t.reshape(-1).clone()
    else:
        tensors[name] = torch.full_like(t, float("nan")) if t.is_floating_point() else t + 1000
    return f"tensor {name}: {kind}"


def mutate_recipe(src: Path, dst: Path, rng: random.Random) -> str:
    """Copy a recipe folder with one mutation.

    Args:
        src: a good recipe folder.
        dst: where to write the mutant.
        rng: seeded generator.

    Returns:
        A description of the mutation.
    """
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    r = rng.random()
    if r < 0.55:
        meta = json.loads((dst / "recipe.json").read_text())
        what = mutate_json(meta, rng, skip=("provenance", "metrics"))
        (dst / "recipe.json").write_text(json.dumps(meta))
    elif r < 0.93:
        tensors = load_file(str(dst / "tensors.safetensors"))
        what = mutate_tensors(tensors, rng)
        save_file(tensors, str(dst / "tensors.safetensors"))
    else:
        name = rng.choice(["recipe.json", "tensors.safetensors"])
        data = (dst / name).read_bytes()
        (dst / name).write_bytes(data[: rng.randrange(len(data))])
        what = f"{name} truncated"
    return what


def mutate_engine(src: Path, dst: Path, rng: random.Random) -> str:
    """Copy an engine folder with one mutation of its engine.json (or a removed or truncated artifact).

    Args:
        src: a good engine folder.
        dst: where to write the mutant.
        rng: seeded generator.

    Returns:
        A description of the mutation.
    """
    shutil.copytree(src, dst)
    if rng.random() < 0.9:
        meta = json.loads((dst / "engine.json").read_text())
        what = mutate_json(meta, rng, skip=("versions", "source_onnx_sha256", "fp32_onnx_sha256"))
        (dst / "engine.json").write_text(json.dumps(meta))
        return what
    art = rng.choice([p for p in dst.iterdir() if p.name != "engine.json" and p.is_file()])
    data = art.read_bytes()
    art.write_bytes(data[: rng.randrange(len(data))])
    return f"{art.name} truncated"


@dataclass
class Outcome:
    code: int
    traceback: str | None
    stderr: str


def run_cli(args: list) -> Outcome:
    """Run ``qexport ARGS`` through ``qexport.cli.main`` in this process.

    Args:
        args: the arguments.

    Returns:
        The exit code, the traceback if an exception escaped (None otherwise), and stderr.
    """
    from qexport.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["qexport", *[str(a) for a in args]]
    tb = None
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:  # noqa: BLE001 - the point: any escaping exception is a traceback for the user
        tb = traceback.format_exc()
        code = -1
    finally:
        sys.argv = argv
    return Outcome(code, tb, err.getvalue())


def clean_failure(o: Outcome) -> bool:
    """Success, a failed check (exit 1), or exit 2 with exactly one ``error:`` line and no traceback."""
    if o.traceback is not None or "Traceback" in o.stderr:
        return False
    if o.code == 2:
        lines = [ln for ln in o.stderr.splitlines() if ln.strip()]
        return len(lines) == 1 and lines[0].startswith("error: ")
    return o.code in (0, 1)
