"""The dataset layout on disk, owned here and imported by captioning and train.

Kohya's contract: a training root holds `<repeats>_<tokens>` folders; each image may have a sidecar caption
with the same stem. This module knows the names; it reads and writes no pixels.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".ppm", ".tga"}
)
"""Extensions treated as pictures when a folder of prepared images is read (case-insensitive)."""

CAPTION_EXTENSIONS = (".txt", ".caption")
"""Sidecar caption files that travel with their image; `.txt` is what lorasmith writes and reads."""

SIDECAR_EXTENSIONS = frozenset({*CAPTION_EXTENSIONS, ".json", ".npz", ".npy", ".md"})
"""Never treated as input pictures: captions, Kohya metadata and latent caches, notes."""

IGNORED_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})

REPORT_NAME = "prep_report.json"

OUTPUT_MARKER = ".lorasmith-output"
"""A file train-lora puts in every folder it makes for its own outputs (samples, states, logs): readers of a
training root skip such folders by what they are, whatever their name, so `5_x.samples/` is never data."""

_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f\udc80-\udcff]')
"""Characters no portable file name holds, and the stand-ins Python uses for bytes that are not UTF-8."""

STEM_BYTES = 200
"""Longest output stem in UTF-8 bytes: with `.png`, a `_2` for clashes and a temporary name's `.<pid>.<random>.part`
it stays within the 255 bytes file systems allow."""

NAME_BYTES = 255
"""Longest file or folder name, in UTF-8 bytes, that common file systems (ext4, APFS, NTFS) allow."""

_SPECIAL = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"),
            (stat.S_ISBLK, "device"))


@dataclass(frozen=True)
class RepeatFolder:
    """One `<repeats>_<tokens>` folder of a Kohya training root."""

    path: Path
    repeats: int
    tokens: str


def repeat_folder_name(repeats: int, name: str) -> str:
    """`10_claymation style`: Kohya splits at the first underscore, so `name` may hold spaces and underscores."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    return f"{repeats}_{name}"


def parse_repeat_folder(path: Path) -> RepeatFolder | None:
    """The repeats and tokens of a folder named like Kohya's, or None for any other folder."""
    match = _REPEAT_FOLDER.match(path.name)
    if not match or int(match.group(1)) < 1:
        return None
    return RepeatFolder(path, int(match.group(1)), match.group(2))


def not_a_repeat_folder(name: str) -> str:
    """Why a folder name is not read as `<repeats>_<name>`, in words a user can act on."""
    example = f"10_{name.split('_', 1)[-1] or 'clay'}"
    if re.fullmatch(r"\d+_", name):
        return f"no name after the underscore (e.g. {example})"
    if _REPEAT_FOLDER.match(name):
        return f"0 repeats: its pictures would never be seen (e.g. {example})"
    return f"not a <repeats>_<name> folder (e.g. {example})"


def stray_pictures(root: Path, exclude: Iterable[Path] = ()) -> list[str]:
    """Warnings for the sub-folders of a training root that hold pictures but are not repeat folders, so
    none are left out without a word."""
    skip = {p.resolve() for p in exclude}
    lines = []
    for sub in sorted(root.iterdir()) if root.is_dir() else ():
        if (sub.name.startswith(".") or not sub.is_dir() or parse_repeat_folder(sub) or sub.resolve() in skip
                or is_own_output(sub)):
            continue
        try:
            count = sum(1 for _ in iter_images(sub))
        except OSError:
            continue
        if count:
            lines.append(f"{sub}{os.sep}: {not_a_repeat_folder(sub.name)}; its {count} picture(s) are not used")
    return lines


def repeat_folders(root: Path) -> list[RepeatFolder]:
    """The repeat folders directly inside a training root, or `root` itself when it is one; train-lora's own
    output folders are never among them."""
    own = parse_repeat_folder(root)
    if own is not None:
        return [own]
    found = (parse_repeat_folder(p) for p in sorted(root.iterdir()) if p.is_dir() and not is_own_output(p))
    return [f for f in found if f is not None]


def is_own_output(folder: Path) -> bool:
    """Whether train-lora made `folder` for its own outputs (it holds OUTPUT_MARKER)."""
    try:
        return (folder / OUTPUT_MARKER).is_file()
    except OSError:
        return False


def validate_name(name: str) -> str:
    """The concept name as it will appear in the folder name; raises ValueError with the fix."""
    cleaned = unicodedata.normalize("NFC", name).strip()
    if not cleaned:
        raise ValueError("NAME is empty: give the concept or trigger tokens, e.g. --name 'claymation style'")
    if _UNSAFE.search(cleaned) or cleaned in {".", ".."}:
        raise ValueError(f"NAME {name!r} holds characters that cannot appear in a folder name (<>:\"/\\|?*)")
    return cleaned


def check_folder_name(name: str, repeats: int) -> None:
    """ValueError naming --name when `<repeats>_<name>` would not fit in one file name. `repeats` is the
    largest count the run may end with: the folder is renamed when the count changes."""
    size = len(repeat_folder_name(repeats, name).encode("utf-8"))
    if size > NAME_BYTES:
        room = NAME_BYTES - len(f"{repeats}_")
        raise ValueError(f"--name is too long: the folder {repeats}_<name> would be {size} bytes, over the "
                         f"{NAME_BYTES}-byte limit file systems set on a name; shorten --name to at most {room} "
                         "bytes of UTF-8")


def safe_stem(stem: str) -> str:
    """A file stem that every OS accepts, still recognisably the user's (non-ASCII letters are kept).

    Bytes of a name that are not UTF-8 become `_`; a stem longer than STEM_BYTES is cut at a character
    boundary, so the output and its temporary name fit in a file name.
    """
    cleaned = _UNSAFE.sub("_", unicodedata.normalize("NFC", stem)).strip(" .")
    cleaned = cleaned.encode("utf-8")[:STEM_BYTES].decode("utf-8", "ignore").rstrip(" .")
    return cleaned or "image"


def display(path: Path | str) -> str:
    """A path as text that can be printed and stored: bytes that are not UTF-8 shown as U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def special_kind(mode: int) -> str | None:
    """'named pipe', 'socket' or 'device' for files that must never be opened (a pipe blocks forever)."""
    return next((kind for test, kind in _SPECIAL if test(mode)), None)


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def iter_images(folder: Path) -> Iterator[Path]:
    """Pictures directly inside `folder`, sorted by name, hidden files skipped."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and is_image_name(path):
            yield path


def sidecars(image: Path) -> list[Path]:
    """The caption files that belong to `image` (same folder, same stem)."""
    found = []
    for ext in CAPTION_EXTENSIONS:
        path = image.with_suffix(ext)
        try:
            if path.is_file():
                found.append(path)
        except OSError:  # a name too long for the file system: no such caption can exist
            pass
    return found


def is_candidate_input(path: Path) -> bool:
    """Whether a file found in a source folder should be tried as a picture.

    Unknown extensions are tried too (a PNG saved as `.dat` is still a picture); only files that are
    known never to be pictures are left out, so everything else ends up in the report.
    """
    name = path.name.lower()
    return not (name.startswith(".") or name in IGNORED_NAMES or path.suffix.lower() in SIDECAR_EXTENSIONS)


@dataclass
class Scan:
    files: list[Path] = field(default_factory=list)
    """Candidate inputs, sorted."""
    special: list[tuple[Path, str]] = field(default_factory=list)
    """(path, reason) for files that must never be opened: pipes, sockets, devices."""
    unlistable: list[tuple[Path, str]] = field(default_factory=list)
    """(path, reason) for folders that could not be read."""


def scan_sources(src: Path, exclude: Iterable[Path] = ()) -> Scan:
    """Every candidate input below `src`, recursively and sorted, leaving out the `exclude` trees.

    Excluding the output folder matters when it lies inside `src`: outputs must never be re-ingested.
    Special files are recognised by type from their metadata and never opened.
    """
    excluded = [e.resolve() for e in exclude]
    scan = Scan()

    def unlistable(error: OSError) -> None:
        scan.unlistable.append((Path(error.filename), f"cannot list this folder: {error.strerror or error}"))

    for dirpath, dirnames, filenames in os.walk(src, onerror=unlistable):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded
        )
        for name in sorted(filenames):
            path = here / name
            if not is_candidate_input(path):
                continue
            try:
                kind = special_kind(path.stat().st_mode)
            except OSError:
                kind = None  # a broken link: the loader reports it
            if kind:
                scan.special.append((path, f"{kind}: not a picture file, not opened"))
            else:
                scan.files.append(path)
    return scan


def output_stems(sources: list[Path], src: Path, previous: dict[Path, str] | None = None,
                 reserved: Iterable[str] = ()) -> dict[Path, str]:
    """A distinct, recognisable output stem for every source.

    A source keeps the stem an earlier run gave it (`previous`), so adding `cat.png` beside `cat.jpg` never
    renames `cat.jpg`'s output away from the caption the user wrote for it; `reserved` stems (outputs whose
    source has gone) are never reused. Otherwise a stem is kept as it is unless another source or output
    has it, case-insensitively since Windows and macOS folders are: then the extension joins it
    (`cat_png`), then the sub-folder, then a counter.
    """

    def taken_key(stem: str) -> str:
        return stem.casefold()

    def proposals(path: Path) -> list[str]:
        stem = safe_stem(path.stem)
        ext = path.suffix.lstrip(".").lower()
        with_ext = safe_stem(f"{stem}_{ext}") if ext else stem
        parts = [safe_stem(p) for p in path.relative_to(src).parent.parts]
        with_dir = safe_stem("_".join([*parts, with_ext])) if parts else with_ext
        return [stem, with_ext, with_dir]

    chosen: dict[Path, str] = {}
    used: set[str] = {taken_key(stem) for stem in reserved}
    for path in sources:
        stem = (previous or {}).get(path)
        if stem and taken_key(stem) not in used:
            chosen[path] = stem
            used.add(taken_key(stem))
    rest = [p for p in sources if p not in chosen]
    level = {p: 0 for p in rest}
    while True:
        wanted = {p: proposals(p)[level[p]] for p in rest}
        counts: dict[str, int] = {key: 1 for key in used}
        for stem in wanted.values():
            counts[taken_key(stem)] = counts.get(taken_key(stem), 0) + 1
        clashes = [p for p, s in wanted.items() if counts[taken_key(s)] > 1 and level[p] < 2]
        if not clashes:
            break
        for p in clashes:
            level[p] += 1
    for path in rest:
        stem = wanted[path]
        candidate, n = stem, 2
        while taken_key(candidate) in used:
            candidate, n = f"{stem}_{n}", n + 1
        used.add(taken_key(candidate))
        chosen[path] = candidate
    return {path: chosen[path] for path in sources}
