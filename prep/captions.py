"""Sidecar captions travel with their picture, without ever overwriting what the user wrote since."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lorasmith.common.files import sha256_file, write_bytes_atomic
from lorasmith.common.layout import CAPTION_EXTENSIONS, is_image_name, sidecars
from lorasmith.common.sidecar import SidecarError, utf8_copy


def sync_captions(source: Path, output: Path, copied_before: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Copy `source`'s `.txt`/`.caption` files beside `output` as UTF-8 text; return ({file name: sha256} of
    our copies, problems naming the caption).

    A caption already beside the output is replaced only when it is still exactly our earlier copy and the
    source's caption changed since; one the user (or caption-folder) edited there is kept as it is. A
    caption that cannot be read as text, or whose place is taken by a folder, is reported and not copied.
    """
    copied: dict[str, str] = {}
    problems: list[str] = []
    for caption in sidecars(source):
        target = output.with_suffix(caption.suffix)
        try:
            data = utf8_copy(caption)
        except SidecarError as exc:
            problems.append(f"caption {caption.name} {exc}; not copied")
            continue
        wanted = hashlib.sha256(data).hexdigest()
        if target.exists() or target.is_symlink():
            if not target.is_file():
                problems.append(f"{target.name} in {target.parent.name} is not a file; caption not copied")
                continue
            try:
                current = sha256_file(target)
            except OSError as exc:
                problems.append(f"{target.name} in {target.parent.name} cannot be read ({exc.strerror}); "
                                "caption not copied")
                continue
            if current == wanted or copied_before.get(target.name) != current:
                if copied_before.get(target.name) == current:
                    copied[target.name] = current
                continue
        write_bytes_atomic(target, data)
        copied[target.name] = wanted
    return copied, problems


def orphan_captions(folder: Path) -> list[tuple[str, str]]:
    """(caption name, why) for captions in a prepared folder that belong to no picture there any more."""
    stems = {p.stem for p in folder.iterdir() if is_image_name(p) and not p.name.startswith(".")}
    return [(p.name, "belongs to no picture in this folder (its picture was removed as a duplicate, or by "
                     "hand); rename or delete it")
            for p in sorted(folder.iterdir())
            if p.suffix in CAPTION_EXTENSIONS and not p.name.startswith(".") and p.stem not in stems]
