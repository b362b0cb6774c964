"""Calibrators, registered by name: each turns (float model, plan, data or none, options) into a calibrated
QuantSim, which the pipeline saves as a QuantRecipe.

    @register_calibrator("minmax", config=MinMaxConfig, needs_data=True, summary="...")
    def calibrate_minmax(ctx: CalibrationContext, cfg: MinMaxConfig) -> dict: ...
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from qexport.errors import QexportError


@dataclass(frozen=True)
class CalibratorInfo:
    """A registered calibration method."""

    name: str
    fn: Callable
    config: type
    needs_data: bool
    summary: str


_REGISTRY: dict[str, CalibratorInfo] = {}
# Modules that register calibrators when imported (kept lazy: some import heavy code).
_MODULES = ("qexport.calibrators.baseline", "qexport.calibrators.gpfq", "qexport.calibrators.adasg",
            "qexport.calibrators.brecq", "qexport.calibrators.mixmix")


def register_calibrator(name: str, *, config: type, needs_data: bool, summary: str) -> Callable:
    """Decorator registering a calibrator function ``fn(ctx, cfg) -> metrics dict``.

    Args:
        name: the ``--method`` name.
        config: frozen dataclass of the method's options (validated on construction).
        needs_data: the method reads calibration images (False: data-free).
        summary: one line for ``qexport methods``.

    Returns:
        The decorator.
    """

    def deco(fn: Callable) -> Callable:
        _REGISTRY[name] = CalibratorInfo(name, fn, config, needs_data, summary)
        return fn

    return deco


def _load_all() -> None:
    for mod in _MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real missing dependency inside the module
                raise


def list_calibrators() -> list[CalibratorInfo]:
    """All registered calibrators, sorted by name."""
    _load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_calibrator(name: str) -> CalibratorInfo:
    """The calibrator registered as ``name``.

    Args:
        name: method name.

    Returns:
        Its CalibratorInfo.
    """
    _load_all()
    if name not in _REGISTRY:
        raise QexportError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))} (see `qexport methods`)")
    return _REGISTRY[name]
