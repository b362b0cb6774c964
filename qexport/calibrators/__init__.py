"""Calibrators, registered by name: each turns (float model, plan, data or none, options) into a calibrated
QuantSim, which the pipeline saves as a QuantRecipe.

    @register_calibrator("minmax", config=MinMaxConfig, needs_data=True, summary="...")
    def calibrate_minmax(ctx: CalibrationContext, cfg: MinMaxConfig) -> dict: ...

Adding a method is one module: every module of this package is imported on first use (built-ins), and so is
every module named by an entry point of the group ``qexport.calibrators`` (a separate pip package declares
``[project.entry-points."qexport.calibrators"] mymethod = "mypkg.mymethod"``). The config dataclass's fields
become the method's CLI options (:mod:`qexport.options`); ``contract_options`` are the small-budget options
the contract test (tests/test_contract.py) runs every method with.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from importlib import metadata
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
    contract_options: dict = field(default_factory=dict)
    source: str = ""
    needs_labels: bool = False


_REGISTRY: dict[str, CalibratorInfo] = {}
ENTRY_POINT_GROUP = "qexport.calibrators"
_LOADED = False


def register_calibrator(name: str, *, config: type, needs_data: bool, summary: str,
                        contract_options: dict | None = None, needs_labels: bool = False) -> Callable:
    """Decorator registering a calibrator function ``fn(ctx, cfg) -> metrics dict``.

    Args:
        name: the ``--method`` name.
        config: frozen dataclass of the method's options (validated on construction; each field's
            ``metadata["help"]`` is its CLI help).
        needs_data: the method reads calibration images (False: data-free).
        summary: one line for ``qexport methods``.
        contract_options: options that make the method run in seconds on a tiny model (a tiny budget), used
            by the contract test; a config classmethod ``contract_options()`` works too.
        needs_labels: the method trains on a labelled folder (QAT): the pipeline does not load images into
            ``ctx.data`` but passes the folder as ``ctx.data_dir``; a flat folder is refused.

    Returns:
        The decorator.
    """

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise QexportError(f"calibrator {name!r} is registered twice ({_REGISTRY[name].source} and "
                               f"{fn.__module__})")
        quick = dict(contract_options or {})
        if not quick and hasattr(config, "contract_options"):
            quick = dict(config.contract_options())
        _REGISTRY[name] = CalibratorInfo(name, fn, config, needs_data, summary, quick, fn.__module__, needs_labels)
        return fn

    return deco


def _builtin_modules() -> list[str]:
    return [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]


def _load_entry_points(group: str) -> None:
    """Import every entry point of ``group`` (a module registers on import; a callable is called)."""
    for ep in metadata.entry_points(group=group):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not take the built-ins down with it
            raise QexportError(f"plugin {ep.name!r} ({ep.value}) of {group} failed to load: "
                               f"{type(e).__name__}: {e}") from None
        if callable(obj) and not isinstance(obj, type):
            obj()


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for mod in _builtin_modules():
        importlib.import_module(mod)
    _load_entry_points(ENTRY_POINT_GROUP)
    _LOADED = True


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
