"""SIGTERM and SIGINT as a request to stop cleanly: spot instances send SIGTERM shortly before they vanish.

What a first signal does depends on the phase of the run:
- before training (loading, caching latents): stop at once with Interrupted; there is nothing to resume
  from this run yet, and every file written so far is whole (each is written under a temporary name);
- inside `defer(...)` (the training loop, the final save): let the current step or save finish; the
  trainer then writes a state and exits with PREEMPTED_EXIT, or, after the final save, simply finishes.
A second signal means "now": the process exits at once with 128 + the signal's number (a state being
written at that moment stays a temporary folder, which --resume ignores and the next run clears).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

PREEMPTED_EXIT = 75
"""EX_TEMPFAIL from sysexits.h: "try again later", which is what a preempted job should do."""


class Interrupted(BaseException):
    """A stop request before training began; a BaseException so no `except Exception` swallows it."""

    def __init__(self, signum: int, phase: str):
        super().__init__(signum, phase)
        self.name, self.phase = signal.Signals(signum).name, phase


class StopSignals:
    def __init__(self, log=None):
        self.requested: int | None = None
        self.phase = "starting"
        self.deferred: str | None = None
        """While set, a first signal is only recorded; the text says what happens first."""
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            self.log(f"train-lora: second {name}: exiting now without saving")
            os._exit(128 + signum)
        self.requested = signum
        if self.deferred is None:
            raise Interrupted(signum, self.phase)
        self.log(f"train-lora: {name} received: {self.deferred} (send it again to exit at once)")

    @contextlib.contextmanager
    def defer(self, what_first: str) -> Iterator[None]:
        """Within this block a first signal waits for `what_first` to be done."""
        before, self.deferred = self.deferred, what_first
        try:
            yield
        finally:
            self.deferred = before

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else ""
