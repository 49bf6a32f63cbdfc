"""`--dry-run`: what a run would do, read from file headers alone, without decoding or writing anything."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from lorasmith.common.layout import display, output_stems, repeat_folder_name, scan_sources
from lorasmith.prep.picture import PrepOptions
from lorasmith.common.sizing import auto_repeats, choose_size, is_small

_SWAPS_AXES = {5, 6, 7, 8}


def header_size(path: Path) -> tuple[int, int]:
    """The upright size of a picture from its header (EXIF rotation applied), without decoding pixels."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(0x0112, 1) in _SWAPS_AXES:
            width, height = height, width
    return width, height


def plan_lines(src: Path, dst: Path, name: str, options: PrepOptions, repeats: int | None) -> list[str]:
    scan = scan_sources(src, exclude=[dst])
    sources = scan.files
    stems = output_stems(sources, src)
    lines, usable = [], 0
    for path, reason in scan.special + scan.unlistable:
        lines.append(f"  {display(path.relative_to(src))}: {reason} — would be reported")
    for source in sources:
        rel = display(source.relative_to(src).as_posix())
        try:
            width, height = header_size(source)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            lines.append(f"  {rel}: cannot be read ({type(exc).__name__}) — would be reported as failed")
            continue
        target = choose_size(width, height, options.min_side, options.max_side, options.area)
        note = ""
        if is_small(width, height, options.min_side):
            note = "  [small: upscaled]" if options.upscale else "  [small: skipped]"
            if not options.upscale:
                lines.append(f"  {rel}: {width}×{height}{note}")
                continue
        usable += 1
        lines.append(f"  {rel}: {width}×{height} → {target[0]}×{target[1]} as {stems[source]}.png{note}")
    count = repeats or auto_repeats(usable)
    how = "as given" if repeats else f"auto: max(100, ceil(1500 / {usable}))"
    head = [
        f"plan for {len(sources)} file(s) in {display(src)}:",
        *lines,
        f"repeats: {count} ({how}) → {display(dst / repeat_folder_name(count, name))}",
        f"{usable} picture(s) × {count} repeats = {usable * count} image views per epoch",
        "dry run: nothing was written (duplicates and corrupt pixel data are only found by a real run)",
    ]
    return head
