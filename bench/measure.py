"""Wall time and peak memory of a command's whole process tree (workers included), sampled every 10 ms."""

from __future__ import annotations

import subprocess
import time

import psutil


def measure(command: list[str], cwd=None, env=None) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, stdout) of `command`; raises SystemExit with its stderr when it fails."""
    start = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env, text=True)
    peak = 0
    while process.poll() is None:
        total = 0
        try:
            for proc in [process, *process.children(recursive=True)]:
                total += proc.memory_info().rss
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    out, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({process.returncode}): {err[-3000:]}")
    return elapsed, peak / 2**20, out
