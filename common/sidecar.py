"""Sidecar captions: one rule, shared by prep, captioning and train, for reading and writing them.

- A sidecar is `<picture stem><extension>` beside the picture; the extension can never be a picture's, so
  no caption write can land on a picture.
- Text is read as UTF-8 with a byte-order mark stripped; UTF-16 and UTF-32 (Windows Notepad's "Unicode")
  are recognised, and UTF-16 without a mark by the pattern of its high bytes. Anything else is refused by
  name rather than guessed at: a wrong guess would train on, or write back, garbage. So is text holding
  control characters other than tabs and line breaks, which is what a wrong encoding leaves behind.
- Written captions are UTF-8 without a mark, which Kohya and every trainer read. A caption keeps its
  permission bits, and one the user made read-only is never rewritten.
"""

from __future__ import annotations

import codecs
import os
import stat
import unicodedata
from collections import Counter
from pathlib import Path

from lorasmith.common.files import write_text_atomic
from lorasmith.common.layout import IMAGE_EXTENSIONS, special_kind

_BOMS = (  # longest first: the UTF-32 LE mark begins with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"),
)


_TEXT_CONTROLS = "\t\n\r"
"""The only control characters clean text holds."""


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


def control_character(text: str, allowed: str = "") -> str | None:
    """The first control character of `text` outside `allowed`, as `U+000A`; None when there is none. Kohya
    reads only a caption's first line, and other control characters are debris of a wrong encoding."""
    found = next((c for c in text if c not in allowed and unicodedata.category(c) == "Cc"), None)
    return None if found is None else f"U+{ord(found):04X}"


def decode_text(data: bytes) -> str:
    """Caption bytes as clean text: UTF-8 (mark stripped), or UTF-16/32 with a mark or recognisable without.
    SidecarError for any other encoding, and for text holding control characters other than tabs and line
    breaks (UTF-16 read as UTF-8 looks like that: `c\\x00l\\x00a\\x00y`)."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                text = data[len(bom):].decode(encoding)
            except UnicodeDecodeError:
                raise SidecarError(f"is marked as {encoding.upper()} but is not valid {encoding.upper()}; "
                                   "re-save it as UTF-8") from None
            problem = _unclean(text)
            if problem:
                raise SidecarError(problem)
            return text
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = f"is not UTF-8 text (byte {exc.start} is 0x{data[exc.start]:02x}); re-save it as UTF-8"
    else:
        problem = _unclean(text)
        if problem is None:
            return text
    guess = _unmarked_utf16(data)
    if guess is None:
        raise SidecarError(problem)
    return guess


def _unclean(text: str) -> str | None:
    """Why `text` is not clean text, or None."""
    if "\0" in text:
        return "holds NUL bytes: it is not a text file; re-save it as UTF-8 text"
    found = control_character(text, _TEXT_CONTROLS)
    if found:
        return (f"holds the control character {found}, so it is not clean text (a file in another encoding?); "
                "re-save it as UTF-8 text")
    return None


def _unmarked_utf16(data: bytes) -> str | None:
    """UTF-16 without a mark, recognised by its high bytes: text in one or two alphabets repeats one or two
    of them (0x00 for Latin, 0x04 for Cyrillic) in every other position, while the low bytes vary more.
    None when neither byte order shows that (too short to tell is the same), or the text it gives is not
    printable."""
    if len(data) < 2 or len(data) % 2:
        return None
    found = []
    for encoding, high, low in (("utf-16-le", data[1::2], data[0::2]), ("utf-16-be", data[0::2], data[1::2])):
        common = sum(n for _, n in Counter(high).most_common(2))
        latin = high.count(0) * 2 > len(high) and 0 not in low
        if not latin and (len(high) < 4 or common * 10 < len(high) * 9 or len(set(low)) <= len(set(high))):
            continue
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if all(c.isprintable() or c in _TEXT_CONTROLS or unicodedata.category(c) == "Zs" for c in text):
            found.append((high.count(0), encoding == "utf-16-le", text))
    return max(found)[2] if found else None


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
