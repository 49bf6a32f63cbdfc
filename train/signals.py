"""SIGTERM and SIGINT as a request to stop cleanly: spot instances send SIGTERM shortly before they vanish.

The first signal lets the current step finish; the trainer then writes a state and exits with
PREEMPTED_EXIT. A second signal means "now": the process exits at once with 128 + the signal's number
(a state being written at that moment stays a temporary folder, which --resume ignores).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

PREEMPTED_EXIT = 75
"""EX_TEMPFAIL from sysexits.h: "try again later", which is what a preempted job should do."""


class StopSignals:
    def __init__(self, log=None):
        self.requested: int | None = None
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            self.log(f"train-lora: second {name}: exiting now without saving")
            os._exit(128 + signum)
        self.requested = signum
        self.log(f"train-lora: {name} received: finishing this step, then saving a state "
                 f"(send it again to exit at once)")

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
