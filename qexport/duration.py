"""Durations given on the command line (``--time-budget 30m``)."""

from __future__ import annotations

import re

from qexport.errors import QexportError


def parse_duration(text: str | None) -> float | None:
    """``30m``, ``2h``, ``90s``, ``1h30m`` or plain seconds -> seconds (None stays None)."""
    if text is None:
        return None
    t = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", t)
    if not parts or "".join(a + b for a, b in parts) != t:
        raise QexportError(f"--time-budget {text!r} is not a duration; use e.g. 30m, 2h, 1h30m or 90s")
    mult = {"h": 3600.0, "m": 60.0, "s": 1.0}
    return sum(float(a) * mult[b] for a, b in parts)
