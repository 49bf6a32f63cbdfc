"""Writing files so that an interrupted run never leaves a half-written file under a real name."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
"""mkstemp creates files readable by their owner alone; results get the mode any other new file would."""


@contextlib.contextmanager
def atomic_writer(path: Path, mode: str = "wb", fsync: bool = False) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success it replaces `path` in one rename.

    The temporary name starts with a dot and ends in `.part`, so no reader mistakes it for a result; on
    any error it is removed and `path` keeps whatever it held before.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, _FILE_MODE)
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_writer(path, "w") as handle:
        handle.write(text)


def copy_atomic(src: Path, dst: Path) -> None:
    with open(src, "rb") as source, atomic_writer(dst) as target:
        while chunk := source.read(1 << 20):
            target.write(chunk)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
