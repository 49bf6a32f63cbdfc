"""Sidecar captions travel with their picture, without ever overwriting what the user wrote since."""

from __future__ import annotations

from pathlib import Path

from lorasmith.prep.files import copy_atomic, sha256_file
from lorasmith.prep.layout import sidecars


def sync_captions(source: Path, output: Path, copied_before: dict[str, str]) -> dict[str, str]:
    """Copy `source`'s `.txt`/`.caption` files beside `output`; return {file name: sha256} of our copies.

    A caption already beside the output is replaced only when it is still exactly our earlier copy and the
    source's caption changed since; one the user (or caption-folder) edited there is kept as it is.
    """
    copied: dict[str, str] = {}
    for caption in sidecars(source):
        target = output.with_suffix(caption.suffix)
        wanted = sha256_file(caption)
        if target.exists():
            current = sha256_file(target)
            if current == wanted or copied_before.get(target.name) != current:
                if copied_before.get(target.name) == current:
                    copied[target.name] = current
                continue
        copy_atomic(caption, target)
        copied[target.name] = wanted
    return copied
