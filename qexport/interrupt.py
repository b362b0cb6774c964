"""Graceful Ctrl-C for long loops that checkpoint (AdaSG and other training calibrators)."""

from __future__ import annotations

import signal
import threading


class GracefulInterrupt:
    """Context manager: SIGINT sets ``flag`` instead of raising, so a loop can finish its step and save a
    checkpoint; a second Ctrl-C raises KeyboardInterrupt at once. Outside the main thread it does nothing."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                if self.flag:
                    raise KeyboardInterrupt
                self.flag = True

            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False
