"""Writing files so that an interrupted run never leaves a half-written file under a real name.

Temporary files are named `.<name>.<pid>.<random>.part`: hidden, obviously unfinished, and traceable to the
process that wrote them, so the next run can clear what a killed process left without touching the files
of a process that is still alive.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lorasmith.common.layout import OUTPUT_MARKER

PART = ".part"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
"""mkstemp creates files readable by their owner alone; results get the mode any other new file would."""


class StorageError(OSError):
    """A write failed for a reason of the disk (full, read-only, permission); the message names the path."""


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def free_space(path: Path) -> str:
    """`123 MiB free` on the disk holding `path` (or its nearest existing parent)."""
    try:
        existing = next(p for p in (path, *path.parents) if p.exists())
        return f"{shutil.disk_usage(existing).free / 2**20:.0f} MiB free"
    except (OSError, StopIteration):
        return "free space unknown"


def storage_message(exc: OSError, path: Path) -> str:
    """One sentence for a failed write: a full disk with its free space, or the path and the reason."""
    if is_disk_full(exc):
        return f"the disk holding {path.parent} is full ({free_space(path)}) while writing {path.name}"
    return f"could not write {path}: {exc.strerror or exc}"


def alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_pid(name: str) -> int | None:
    """The process id in a temporary name `.<name>.<pid>.<random>.part` (None for other names)."""
    parts = name.rsplit(".", 3)
    return int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None


def clear_stale_parts(folder: Path) -> int:
    """Delete temporary files in `folder` that no live process is writing; returns how many.

    A `.part` without a process id comes from a run that predates the naming, or from a copy: no live
    writer can claim it either.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(PART)):
            continue
        pid = owner_pid(entry.name)
        if pid is not None and pid != os.getpid() and alive(pid):
            continue
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
            removed += 1
    return removed


def temp_name(path: Path) -> str:
    """The prefix of `path`'s temporary names (tempfile adds a random part and `.part`)."""
    return f".{path.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_writer(path: Path, mode: str = "wb", fsync: bool = False) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it replaces `path` in one rename.

    A file that is replaced keeps its permission bits (a caption the user made group-readable stays so);
    a new one gets the mode any new file would. On any error the temporary file is removed and `path`
    keeps whatever it held before.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        file_mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        file_mode = _FILE_MODE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_name(path), suffix=PART)
    try:
        os.fchmod(fd, file_mode)
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a failed write or flush names no file by itself
        raise


def make_output_folder(folder: Path) -> Path:
    """`folder` made (with its parents) and marked as a folder of outputs, which no dataset reader enters."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / OUTPUT_MARKER
    if not marker.is_file():
        marker.write_text("lorasmith train-lora outputs: never read as training data\n", encoding="utf-8")
    return folder


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_writer(path, "w") as handle:
        handle.write(text)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
