"""Ctrl-C and SIGTERM for commands that work file by file: stop at once, keep every finished file.

Each output is written under a temporary name and renamed, so stopping anywhere loses at most the files in
flight; the command then says how far it got and exits with 128 + the signal's number, as shells expect.
"""

from __future__ import annotations

import signal
import threading


class Stopped(BaseException):
    """A stop request; a BaseException so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.exit_code = 128 + signum


def _raise(signum, frame) -> None:
    raise Stopped(signum)


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise Stopped in the main thread, wherever it is."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _raise)


def worker_signals() -> None:
    """For pool workers: Ctrl-C reaches the whole process group, but only the parent should react; the
    parent ends its workers with SIGTERM, which must simply end them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
