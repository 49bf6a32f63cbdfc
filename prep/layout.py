"""The dataset layout on disk, owned here and imported by captioning and train.

Kohya's contract: a training root holds `<repeats>_<tokens>` folders; each image may have a sidecar caption
with the same stem. This module knows the names; it reads and writes no pixels.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
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

_REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


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


def repeat_folders(root: Path) -> list[RepeatFolder]:
    """The repeat folders directly inside a training root, or `root` itself when it is one."""
    own = parse_repeat_folder(root)
    if own is not None:
        return [own]
    found = (parse_repeat_folder(p) for p in sorted(root.iterdir()) if p.is_dir())
    return [f for f in found if f is not None]


def validate_name(name: str) -> str:
    """The concept name as it will appear in the folder name; raises ValueError with the fix."""
    cleaned = unicodedata.normalize("NFC", name).strip()
    if not cleaned:
        raise ValueError("NAME is empty: give the concept or trigger tokens, e.g. --name 'claymation style'")
    if _UNSAFE.search(cleaned) or cleaned in {".", ".."}:
        raise ValueError(f"NAME {name!r} holds characters that cannot appear in a folder name (<>:\"/\\|?*)")
    return cleaned


def safe_stem(stem: str) -> str:
    """A file stem that every OS accepts, still recognisably the user's (non-ASCII letters are kept)."""
    cleaned = _UNSAFE.sub("_", unicodedata.normalize("NFC", stem)).strip(" .")
    return cleaned or "image"


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def iter_images(folder: Path) -> Iterator[Path]:
    """Pictures directly inside `folder`, sorted by name, hidden files skipped."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and is_image_name(path):
            yield path


def sidecars(image: Path) -> list[Path]:
    """The caption files that belong to `image` (same folder, same stem)."""
    return [p for ext in CAPTION_EXTENSIONS if (p := image.with_suffix(ext)).is_file()]


def is_candidate_input(path: Path) -> bool:
    """Whether a file found in a source folder should be tried as a picture.

    Unknown extensions are tried too (a PNG saved as `.dat` is still a picture); only files that are
    known never to be pictures are left out, so everything else ends up in the report.
    """
    name = path.name.lower()
    return not (name.startswith(".") or name in IGNORED_NAMES or path.suffix.lower() in SIDECAR_EXTENSIONS)


def scan_sources(src: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """Every candidate input below `src`, recursively and sorted, leaving out the `exclude` trees.

    Excluding the output folder matters when it lies inside `src`: outputs must never be re-ingested.
    """
    excluded = [e.resolve() for e in exclude]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded
        )
        found.extend(here / f for f in sorted(filenames) if is_candidate_input(here / f))
    return found


def output_stems(sources: list[Path], src: Path) -> dict[Path, str]:
    """A distinct, recognisable output stem for every source.

    A stem is kept as it is unless another source shares it (case-insensitively, since Windows and macOS
    folders are): then the extension joins it (`cat_jpg`, `cat_png`), then the sub-folder, then a counter.
    """

    def taken_key(stem: str) -> str:
        return stem.casefold()

    def proposals(path: Path) -> list[str]:
        stem = safe_stem(path.stem)
        ext = path.suffix.lstrip(".").lower()
        with_ext = f"{stem}_{ext}" if ext else stem
        parts = [safe_stem(p) for p in path.relative_to(src).parent.parts]
        with_dir = "_".join([*parts, with_ext]) if parts else with_ext
        return [stem, with_ext, with_dir]

    chosen: dict[Path, str] = {}
    level = {p: 0 for p in sources}
    while True:
        wanted = {p: proposals(p)[level[p]] for p in sources}
        counts: dict[str, int] = {}
        for stem in wanted.values():
            counts[taken_key(stem)] = counts.get(taken_key(stem), 0) + 1
        clashes = [p for p, s in wanted.items() if counts[taken_key(s)] > 1 and level[p] < 2]
        if not clashes:
            break
        for p in clashes:
            level[p] += 1
    used: set[str] = set()
    for path in sources:
        stem = wanted[path]
        candidate, n = stem, 2
        while taken_key(candidate) in used:
            candidate, n = f"{stem}_{n}", n + 1
        used.add(taken_key(candidate))
        chosen[path] = candidate
    return chosen
