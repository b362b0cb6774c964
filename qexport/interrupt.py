"""Graceful Ctrl-C (and SIGTERM) for long loops that checkpoint (the shared training loop)."""

from __future__ import annotations

import signal
import threading
import time


class GracefulInterrupt:
    """Context manager: SIGINT or SIGTERM sets ``flag`` instead of raising, so a loop can finish its step and save a
    checkpoint; another signal more than ``grace`` seconds later raises KeyboardInterrupt at once (under torchrun
    a Ctrl-C reaches a worker twice, from the terminal and forwarded by torchrun, within that time). Outside the
    main thread it does nothing.

    Args:
        grace: seconds after the first signal during which a repeat is not taken as "stop now".
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, grace: float = 2.0):
        self.flag = False
        self.grace = grace
        self._first: float | None = None
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        now = time.monotonic()
        if self.flag and self._first is not None and now - self._first > self.grace:
            raise KeyboardInterrupt
        if not self.flag:
            self._first = now
        self.flag = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False
