"""Imports point down the layers (README, architecture): every ``import qexport.X`` in the package, function-level
imports included, is parsed with ``ast`` and checked against the layer order below."""

from __future__ import annotations

import ast
from pathlib import Path

import qexport

PACKAGE = Path(qexport.__file__).resolve().parent

# Bottom to top. A module may import its own layer and the layers below it, never one above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("", "errors", "fileio", "progress", "interrupt", "shared", "latency", "options", "schema",
     "duration", "device", "plugins"),
    ("models",),
    ("data",),
    ("zoo",),
    ("quant",),
    ("training",),
    ("calibrators",),
    ("recipe",),
    ("calibrate", "mixed"),
    ("export",),
    ("runtimes",),
    ("build_engine",),
    ("verify",),
    ("run", "compare"),
    ("cli", "__main__"),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
# Known upward imports, each with the reason it is tolerated for now (the list should only shrink).
KNOWN: dict[tuple[str, str], str] = {}


def _top(module: str) -> str:
    """``qexport.quant.plan`` -> ``quant``; ``qexport`` -> ``""``; ``qexport.cli_compare`` -> ``cli``."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    return "cli" if top.startswith("cli_") else top


def _imports(source: str) -> list[tuple[int, str]]:
    """(line, imported qexport module) for every absolute import of the package in a source file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "qexport"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "qexport":  # ``from qexport import quant`` names a subpackage (or __version__)
                found += [(node.lineno, f"qexport.{a.name}") for a in node.names if a.name in RANK]
                found += [(node.lineno, "qexport")] * any(a.name not in RANK for a in node.names)
            elif node.module.startswith("qexport."):
                found.append((node.lineno, node.module))
    return found


def layer_violations(package: Path) -> list[str]:
    """Every import in ``package`` that points up the layers, or from/to a module no layer names.

    Args:
        package: the ``qexport`` package folder.

    Returns:
        One line per violation (``file:line: a (layer) imports b (layer)``).
    """
    bad = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        src_mod = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        src = _top(src_mod)
        if src not in RANK:
            bad.append(f"{path}: module {src_mod} is in no layer (add it to LAYERS)")
            continue
        for line, mod in _imports(path.read_text()):
            dst = _top(mod)
            if (src_mod, mod) in KNOWN:
                continue
            if dst not in RANK:
                bad.append(f"{path}:{line}: imports {mod}, which is in no layer")
            elif RANK[dst] > RANK[src]:
                bad.append(f"{path}:{line}: {src_mod} ({src}) imports {mod} ({dst}), a higher layer")
    return bad


def test_imports_point_down_the_layers():
    assert layer_violations(PACKAGE) == []


def test_quant_imports_nothing_from_export_and_runtimes_nothing_from_verify():
    """The two edges the issue names, spelled out (they are also covered by the layer order)."""
    for sub, forbidden in (("quant", "qexport.export"), ("runtimes", "qexport.verify")):
        for path in (PACKAGE / sub).rglob("*.py"):
            mods = [m for _, m in _imports(path.read_text())]
            assert not [m for m in mods if m == forbidden or m.startswith(forbidden + ".")], path


def test_checker_catches_a_planted_upward_import(tmp_path):
    pkg = tmp_path / "qexport"
    (pkg / "quant").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "quant" / "__init__.py").write_text("")
    (pkg / "quant" / "ok.py").write_text("from qexport.errors import QexportError\n")
    (pkg / "quant" / "bad.py").write_text("def f():\n    from qexport.export.qdq import act_encoding\n")
    (pkg / "runtimes").mkdir()
    (pkg / "runtimes" / "bad.py").write_text("import qexport.verify.compare\nfrom qexport import verify\n")
    bad = layer_violations(pkg)
    assert len(bad) == 3, bad
    assert "quant/bad.py:2: qexport.quant.bad (quant) imports qexport.export.qdq (export)" in bad[0]
    assert all("runtimes/bad.py" in b and "qexport.verify" in b for b in bad[1:])
