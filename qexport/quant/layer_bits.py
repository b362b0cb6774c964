"""Per-layer bit widths (mixed precision): the ``--bits`` map file, ``--layer-bits NAME=wNaM`` and sizes.

A map file is JSON: ``{"default": "w4a8", "layers": {"layer1.0.conv1": "w8a8", "fc": "w8a8"}}``. Layer names
are the module names of the model's Conv2d/Linear layers (``qexport sensitivity`` lists them). The plan holds a
grid per point, so everything after it (calibrators, QuantSim, export, engines, verify) reads each layer's own
width; a tensor feeding several layers takes the widest of their input widths.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qexport.errors import QexportError
from qexport.quant.spec import BitsConfig, check_layer_widths

_WIDTH_RE = re.compile(r"^w(\d+)(?:a(\d+))?$")


def parse_width(text: str, where: str) -> tuple[int, int | None]:
    """``wNaM`` -> (N, M), M None for ``a32`` or no ``a`` part.

    Args:
        text: e.g. ``w8a8``.
        where: what the text belongs to (for the message).

    Returns:
        (weight bits, activation bits or None).
    """
    m = _WIDTH_RE.match(str(text).strip().lower())
    if not m:
        raise QexportError(f"{where}: width {text!r} does not parse; use wNaM such as w8a8 or w4a4")
    a = int(m.group(2)) if m.group(2) is not None else None
    return int(m.group(1)), (None if a == 32 else a)


def parse_layer_items(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``NAME=wNaM`` strings (``--layer-bits``) -> {name: width text}.

    Args:
        items: the repeated option values.

    Returns:
        Layer name -> width text (later entries win).
    """
    out: dict[str, str] = {}
    for item in items:
        name, sep, width = str(item).partition("=")
        if not sep or not name.strip() or not width.strip():
            raise QexportError(f"--layer-bits {item!r} must be NAME=wNaM, e.g. layer1.0.conv1=w8a8")
        out[name.strip()] = width.strip()
    return out


def load_bits_file(path: Path) -> tuple[str, dict[str, str]]:
    """Read a per-layer map file: ``{"default": "w4a8", "layers": {name: "w8a8", ...}}``.

    Args:
        path: the JSON file.

    Returns:
        (default width text, layer name -> width text).
    """
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise QexportError(f"--bits map {path} is not readable JSON ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("default"), str) or not isinstance(d.get("layers", {}), dict):
        raise QexportError(f"--bits map {path} must be {{\"default\": \"w4a8\", \"layers\": {{\"NAME\": \"w8a8\"}}}}")
    return d["default"], {str(k): str(v) for k, v in d.get("layers", {}).items()}


def is_map_file(bits: str) -> bool:
    """True when ``--bits`` names a JSON map file rather than a width."""
    return bits.lower().endswith(".json") or (Path(bits).is_file() and not _WIDTH_RE.match(bits.lower()))


def resolve_bits(bits: str, layer_items: tuple[str, ...] = (), first_last_bits: int | None = None) -> BitsConfig:
    """The BitsConfig of ``--bits`` (a width or a map file) plus ``--layer-bits`` entries (which win).

    Args:
        bits: ``wNaM`` or a JSON map file.
        layer_items: ``NAME=wNaM`` strings.
        first_last_bits: ``--first-last-bits``.

    Returns:
        The BitsConfig (layer names are checked against the model when the plan is built).
    """
    per_layer: dict[str, str] = {}
    if is_map_file(bits):
        if not Path(bits).is_file():
            raise QexportError(f"--bits map file {bits} not found")
        bits, per_layer = load_bits_file(Path(bits))
    per_layer.update(parse_layer_items(layer_items))
    base = BitsConfig.parse(bits, first_last_bits)
    entries = []
    for name, text in per_layer.items():
        w, a = parse_width(text, f"layer {name!r}")
        check_layer_widths(name, w, a, base.act_bits is not None)
        entries.append((name, w, a))
    return BitsConfig(base.weight_bits, base.act_bits, first_last_bits, tuple(entries))


def layer_widths(plan) -> list[dict]:
    """Each quantized layer's widths in a plan: name, kind, weight bits, input bits (None: float).

    Args:
        plan: a QuantPlan.

    Returns:
        One dict per layer, in graph order.
    """
    acts = {ap.name: ap.spec.bits for ap in plan.activations}
    return [{"layer": lp.name, "kind": lp.kind, "weight_bits": lp.weight.bits,
             "input_bits": acts.get(lp.input_point) if lp.input_point else None} for lp in plan.layers]


def weight_bytes(plan, numels: dict[str, int]) -> float:
    """Bytes of the quantized layers' integer weights at their true widths (bits / 8 per weight).

    Args:
        plan: a QuantPlan.
        numels: layer name -> number of weights.

    Returns:
        The size in bytes.
    """
    return sum(numels[lp.name] * lp.weight.bits for lp in plan.layers) / 8.0


def mean_weight_bits(plan, numels: dict[str, int]) -> float:
    """Weight-count-weighted mean weight width of a plan."""
    total = sum(numels[lp.name] for lp in plan.layers)
    return 8.0 * weight_bytes(plan, numels) / max(total, 1)
