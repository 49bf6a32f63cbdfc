"""Helpers for the adversarial suites: run a command as a user would, and check it behaved.

Every case checks the exit code, that no Python traceback reached the user, that the message names the
file or key at fault, and (with `snapshot`) that every original's bytes and mode are unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
HOOKS = Path(__file__).resolve().parent / "hooks"


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Relative path → (sha256, permission bits) of every regular file below `root`."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                out[os.fsdecode(path.relative_to(root))] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                             stat.S_IMODE(info.st_mode))
    return out


def run(command: str, *args, env: dict | None = None, timeout: float = 120, prefix: list[str] = ()
        ) -> subprocess.CompletedProcess:
    """One console script of the project, as a subprocess."""
    full = {**os.environ, **(env or {})}
    return subprocess.run([*prefix, str(BIN / command), *map(os.fspath, args)], capture_output=True, text=True,
                          timeout=timeout, env=full, errors="replace")


def start(command: str, *args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / command), *map(os.fspath, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, errors="replace")


def check_result(code: int, expected: int | tuple[int, ...], err: str, *names: str) -> None:
    """The exit code is `expected`, no traceback was printed, and the message names every one of `names`."""
    allowed = expected if isinstance(expected, tuple) else (expected,)
    assert code in allowed, f"exit {code}, expected {allowed}: {err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    for name in names:
        assert name in err, f"{name!r} not named in: {err[-3000:]}"


def check(done: subprocess.CompletedProcess, expected, *names: str) -> None:
    check_result(done.returncode, expected, done.stderr + done.stdout, *names)


def slow_replace(pattern: str, seconds: float, mark: Path) -> dict:
    """Environment for a subprocess whose os.replace stalls on destinations containing `pattern` (see hooks/)."""
    return {"PYTHONPATH": os.pathsep.join([str(HOOKS), os.environ.get("PYTHONPATH", "")]),
            "LORASMITH_TEST_SLOW_REPLACE": f"{pattern}:{seconds}", "LORASMITH_TEST_MARK": str(mark)}


def wait_for_mark(mark: Path, process: subprocess.Popen, lines: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"ended before the mark (exit {process.returncode}): {process.communicate()[1][-3000:]}")
        if mark.is_file() and len(mark.read_text(encoding="utf-8").splitlines()) >= lines:
            return
        time.sleep(0.02)
    process.kill()
    raise AssertionError("the mark never came")


def unprivileged() -> list[str]:
    """A command prefix under which file permissions apply: empty for a normal user; for root, setpriv
    without the capabilities that bypass them. Skips the test where neither is possible."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    probe = Path(f"/tmp/.lorasmith-perm-probe-{os.getpid()}")
    probe.write_text("x")
    probe.chmod(0)
    try:
        denied = subprocess.run([*prefix, "cat", str(probe)], capture_output=True).returncode != 0
    except OSError:
        denied = False
    finally:
        probe.unlink()
    if not denied:
        pytest.skip("running as root and setpriv cannot drop the capabilities that bypass file permissions")
    return prefix


@contextlib.contextmanager
def tiny_disk(folder: Path, size_kib: int, leave_kib: int) -> Iterator[Path]:
    """A real tmpfs of `size_kib` mounted at `folder`, filled but for about `leave_kib` (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
        (folder / ".filler").write_bytes(b"\0" * max(0, free - leave_kib * 1024))
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def lora_main(capsys, *args) -> tuple[int, str]:
    """`lora` in this process (no interpreter start per case): argparse's exit and the guarded exit alike,
    stderr and stdout together."""
    from lorasmith.use.cli import main

    try:
        code = main([*map(str, args)])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err + captured.out
