"""Plug-ins from other pip packages: calibrators and runtimes declared as entry points.

A package adds a method or a runtime by declaring, in its ``pyproject.toml``::

    [project.entry-points."qexport.calibrators"]
    mymethod = "mypkg.mymethod"        # a module that calls @register_calibrator on import

    [project.entry-points."qexport.runtimes"]
    myrt = "mypkg.myrt"                # a module that calls @register_runtime on import
"""

from __future__ import annotations

from importlib import metadata

from qexport.errors import QexportError


def load_entry_points(group: str) -> list[str]:
    """Import every entry point of ``group``: a module registers on import; a callable target is called.

    Args:
        group: ``qexport.calibrators`` or ``qexport.runtimes``.

    Returns:
        The entry point names loaded.
    """
    names = []
    for ep in metadata.entry_points(group=group):
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plug-in is named, not a traceback
            raise QexportError(f"plug-in {ep.name!r} ({ep.value}) of {group} failed to load: "
                               f"{type(e).__name__}: {e}") from None
        if callable(obj) and not isinstance(obj, type):
            obj()
        names.append(ep.name)
    return names
