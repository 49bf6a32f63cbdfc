"""Where `lora` may write: an output never replaces an input, never removes what lorasmith did not write, and
replaces an existing output only when asked (`--overwrite`).

Inputs are compared by file identity (device and inode), so a symlink or a second path to a LoRA or base model
is caught as surely as the same spelling. A diffusers folder is built beside its target and swapped in whole;
an existing folder is replaced only when it holds `MARKER`, the file every merged folder carries.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from lorasmith.common.files import StorageError, storage_message
from lorasmith.use.jobs import JobError

MARKER = "lorasmith_merge.json"
"""Written into every merged diffusers folder: what went in, and the sign that lorasmith made the folder."""


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` (resolved) lies in `folder` (resolved), or is it."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _existing(inputs) -> list[Path]:
    return [Path(p).expanduser() for p in inputs if p is not None and Path(p).expanduser().exists()]


def check_file_output(out: Path, inputs, overwrite: bool) -> None:
    """Refuse `--out` when it is an input (by identity), a folder, or an existing file without `overwrite`."""
    for source in _existing(inputs):
        if _same(out, source) or (source.is_dir() and out.exists() and _inside(out, source)):
            raise JobError(f"--out {out} is {'inside ' if source.is_dir() else ''}the input {source}: originals are "
                           "never overwritten, and an output never replaces an input; choose another name")
    if out.is_dir():
        raise JobError(f"--out {out} is a folder: give a file name, e.g. {out / 'merged.safetensors'}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise JobError(f"--out {out} already exists: add --overwrite to replace it, or choose another name")


def check_folder_output(out: Path, inputs, overwrite: bool) -> None:
    """Refuse a diffusers `--out` folder that is, holds or lies in an input; that is a file; that lorasmith did
    not write (it is never emptied); or that exists without `overwrite`."""
    for source in _existing(inputs):
        if _same(out, source) or _inside(source, out) or (source.is_dir() and _inside(out, source)):
            raise JobError(f"--out {out} would replace or hold the input {source}: choose a new folder")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise JobError(f"--out {out} is a file; a diffusers model is a folder: choose a folder name")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise JobError(f"--out {out} is a folder lorasmith did not write, and it is never emptied: choose a new "
                           "folder name")
        if not overwrite:
            raise JobError(f"--out {out} holds a merged model already: add --overwrite to replace it")


def swap_in(staging: Path, out: Path) -> None:
    """Put the finished folder `staging` at `out`; a former merged folder there is moved aside first and
    removed only once the new one is in place. An empty folder is replaced; any other is left alone."""
    if out.is_dir() and not (out / MARKER).is_file():
        out.rmdir()  # fails unless empty: a user's folder is never removed
    elif out.is_dir():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(staging, out)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """A failed write (read-only folder, full disk, a file where a folder should be) as one sentence naming the
    path, instead of an OSError from deep inside a library."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        where = Path(exc.filename) if isinstance(exc.filename, str) else path
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            raise StorageError(f"could not write {where}: a file stands where a folder is needed") from None
        raise StorageError(storage_message(exc, where)) from None
