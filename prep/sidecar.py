"""Sidecar captions: one rule, shared by prep, captioning and train, for reading and writing them.

- A sidecar is `<picture stem><extension>` beside the picture; the extension can never be a picture's, so
  no caption write can land on a picture.
- Text is read as UTF-8 with a byte-order mark stripped; UTF-16 and UTF-32 (Windows Notepad's "Unicode")
  are recognised. Anything else is refused by name rather than guessed at: a wrong guess would train on,
  or write back, garbage.
- Written captions are UTF-8 without a mark, which Kohya and every trainer read. A caption keeps its
  permission bits, and one the user made read-only is never rewritten.
"""

from __future__ import annotations

import codecs
import os
import stat
from pathlib import Path

from lorasmith.prep.files import write_text_atomic
from lorasmith.prep.layout import IMAGE_EXTENSIONS, special_kind

_BOMS = (  # longest first: the UTF-32 LE mark begins with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"),
)


class SidecarError(ValueError):
    """A caption file that cannot be read or written as asked; the message is the reason, for a line that
    names the file."""


class ReadOnly(SidecarError):
    """The caption is read-only: left as it is, which is not a failure."""


def caption_extension(text: str, option: str = "--caption-extension") -> str:
    """The sidecar extension (`txt` gains its dot); ValueError naming `option` when it cannot be one."""
    ext = text.strip()
    if ext and not ext.startswith("."):
        ext = "." + ext
    if len(ext) < 2 or ext.count(".") != 1 or any(c.isspace() or c in '/\\*?<>|:"' for c in ext):
        raise ValueError(f"{option} {text!r} is not a file extension: use .txt (Kohya's default) or .caption")
    if ext.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"{option} {text!r} is a picture extension: captions written there would replace the "
                         "pictures themselves; use .txt or .caption")
    return ext


def decode_text(data: bytes) -> str:
    """Caption bytes as text: UTF-8 (mark stripped), or UTF-16/32 with a mark or recognisable without."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(encoding)
            except UnicodeDecodeError:
                raise SidecarError(f"is marked as {encoding.upper()} but is not valid {encoding.upper()}; "
                                   "re-save it as UTF-8") from None
    if b"\0" in data:  # no caption holds a NUL; UTF-16 of Latin text is full of them (and valid UTF-8)
        guess = _unmarked_utf16(data)
        if guess is None:
            raise SidecarError("holds NUL bytes: it is not a text file; re-save it as UTF-8 text")
        return guess
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SidecarError(f"is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}); re-save it as "
                           "UTF-8") from None


def _unmarked_utf16(data: bytes) -> str | None:
    """UTF-16 without a mark shows itself by zero bytes in every other position (for Latin text)."""
    if len(data) < 2 or len(data) % 2:
        return None
    odd, even = data[1::2].count(0), data[0::2].count(0)
    encoding = "utf-16-le" if odd > len(data) // 4 and even == 0 else "utf-16-be" if even > len(data) // 4 and odd == 0 else None
    try:
        return data.decode(encoding) if encoding else None
    except UnicodeDecodeError:
        return None


def _read_bytes(path: Path) -> bytes | None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SidecarError(f"cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise SidecarError("is a folder, not a caption file")
    kind = special_kind(info.st_mode)
    if kind:
        raise SidecarError(f"is a {kind}, not a caption file; not read")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SidecarError(f"cannot be read: {exc.strerror or exc}") from None


def read_caption(path: Path) -> str | None:
    """The caption's text, stripped; None when there is no such file. SidecarError for a folder, a special
    file, an unreadable file or text in an unknown encoding."""
    found = load_caption(path)
    return None if found is None else found[0]


def load_caption(path: Path) -> tuple[str, bool] | None:
    """(stripped text, whether the file is plain UTF-8 without a mark) or None when there is no such file;
    a caption that is not plain UTF-8 is worth rewriting, since Kohya reads its mark as part of the text."""
    data = _read_bytes(path)
    if data is None:
        return None
    text = decode_text(data)
    return text.strip(), text.encode("utf-8") == data


def utf8_copy(path: Path) -> bytes:
    """The caption's bytes for a copy: unchanged when they are plain UTF-8, else its text re-encoded so."""
    data = _read_bytes(path) or b""
    text, plain = load_caption(path) or ("", True)
    return data if plain else (text + "\n").encode("utf-8")


def is_read_only(path: Path) -> bool:
    """No write bit for anyone: the user's way of saying "leave this file alone" (root included)."""
    try:
        return not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    except OSError:
        return False


def write_caption(path: Path, text: str) -> None:
    """`text` and a newline as UTF-8 under the caption's name, replacing it atomically and keeping its mode.

    SidecarError when the path is a folder or special file, or the caption is read-only; OSError (disk
    full, permission) is left to the caller, which knows whether the run can go on.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise SidecarError("is a folder: no caption can be written there")
        kind = special_kind(info.st_mode)
        if kind:
            raise SidecarError(f"is a {kind}: no caption can be written there")
        if is_read_only(path):
            raise ReadOnly("is read-only: left as it is (make it writable to let it change)")
    write_text_atomic(path, text + "\n")
