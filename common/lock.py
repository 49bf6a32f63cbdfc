"""One run per output folder: a lock held for the whole run, naming its holder to whoever comes second.

The lock is an advisory `flock` on a hidden file in the folder. The kernel releases it when its process
dies however it dies, so the lock of a killed run is simply taken over; the file's text (command, pid,
host, start time) is only there to tell the second run whom it is waiting for.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class Busy(Exception):
    """Another live process holds the folder; the message names it and what to do."""


class RunLock:
    def __init__(self, folder: Path, command: str, name: str = ".lorasmith.lock"):
        self.path = folder / name
        self.command = command
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise Busy; OSError when the folder cannot be written at all."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not self._lock(fd):
                holder = self._holder(fd)
                os.close(fd)
                raise Busy(f"{self.path.parent} is in use by {holder}: wait for it to finish or stop it, "
                           "then run again")
            try:  # the holder may have removed the file between our open and our lock: lock the live one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"command": self.command, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:  # a full disk: the lock holds all the same, only its holder goes unnamed
            pass
        self.fd = fd

    @staticmethod
    def _lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0))
            return (f"{info['command']} (pid {info['pid']} on {info['host']}, started {info['started']})")
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked: nobody can be holding the file we delete
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
