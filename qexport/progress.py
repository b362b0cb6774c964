"""Progress bars for long loops (rich, on stderr), silent with ``--quiet``."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class _Bar:
    def __init__(self, progress, task):
        self._p, self._t = progress, task

    def advance(self, n: int = 1, **fields) -> None:
        """Advance by ``n`` steps and update the shown fields (e.g. ``info="loss 0.12"``)."""
        if self._p is not None:
            self._p.update(self._t, advance=n, **fields)

    def update(self, **fields) -> None:
        if self._p is not None:
            self._p.update(self._t, **fields)


@contextlib.contextmanager
def progress_bar(total: int | None, description: str, quiet: bool = False) -> Iterator[_Bar]:
    """A progress bar with elapsed time, ETA and a free-text ``info`` field.

    Args:
        total: number of steps (None: unknown).
        description: what is running.
        quiet: show nothing.

    Returns:
        A context manager yielding an object with ``advance(n, info=...)``.
    """
    if quiet:
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(file=sys.stderr)
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, console=console, transient=False) as prog:
        task = prog.add_task(description, total=total, info="")
        yield _Bar(prog, task)
