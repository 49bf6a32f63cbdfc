"""One source picture → one training PNG. Runs in worker processes, so it takes and returns plain data."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from lorasmith.common.crop import choose_box, render
from lorasmith.common.files import is_disk_full
from lorasmith.common.loading import DEFAULT_MAX_PIXELS, WHITE, PictureError, open_picture
from lorasmith.common.sizing import choose_size, draft_request, is_small

PNG_COMPRESS_LEVEL = 3
"""zlib level 3 writes PNGs a few percent larger than the default 6 at about twice the speed."""


@dataclass(frozen=True)
class PrepOptions:
    """Everything that changes the pixels of an output; a change to any of them redoes the picture."""

    min_side: int = 512
    max_side: int = 768
    crop: str = "center"
    background: tuple[int, int, int] = WHITE
    upscale: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    area: int | None = None
    """Size by area (sides multiples of 64, product at most area²), as SDXL trains, instead of by sides alone."""

    def fingerprint(self) -> dict:
        found = {**asdict(self), "background": list(self.background), "format": "png-1"}
        if self.area is None:  # folders prepared before --area existed stay up to date
            del found["area"]
        return found


@dataclass
class Outcome:
    """What happened to one source; becomes one entry of `prep_report.json`."""

    source: str
    status: str  # written | skipped | failed
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    output: str | None = None
    original_size: list[int] | None = None
    output_size: list[int] | None = None
    crop_box: list[float] | None = None
    upscaled: bool = False
    sha256: str | None = None
    pixel_hash: str | None = None
    bytes: int | None = None
    mtime_ns: int | None = None
    captions: dict[str, str] = field(default_factory=dict)


def pixel_hash(image: Image.Image) -> str:
    """SHA-256 of the decoded pixels, fed in strips so a big picture is never copied whole."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    strip = max(1, (4 << 20) // max(1, image.width * 3))
    for top in range(0, image.height, strip):
        digest.update(image.crop((0, top, image.width, min(image.height, top + strip))).tobytes())
    return digest.hexdigest()


def prepare_picture(source: Path, temp_output: Path, options: PrepOptions, outcome: Outcome) -> Outcome:
    """Decode `source`, crop and resize it to its training size and write a PNG to `temp_output`.

    Fills in and returns `outcome`; never raises for a bad picture, since one bad file must not end a
    batch of two hundred.
    """
    try:
        return _prepare(source, temp_output, options, outcome)
    except PictureError as exc:
        outcome.status, outcome.reason = "failed", str(exc)
    except MemoryError:
        outcome.status, outcome.reason = "failed", "out of memory while decoding (try --workers 1)"
    except OSError as exc:
        if is_disk_full(exc) or exc.filename == str(temp_output):
            raise  # the destination's fault, not the picture's: the whole run must stop
        outcome.status, outcome.reason = "failed", f"unexpected error: {type(exc).__name__}: {exc}"
    except Exception as exc:  # a picture Pillow chokes on in an unforeseen way must not end the batch
        outcome.status, outcome.reason = "failed", f"unexpected error: {type(exc).__name__}: {exc}"
    finally:
        if outcome.status != "written":
            temp_output.unlink(missing_ok=True)
    return outcome


def _prepare(source: Path, temp_output: Path, options: PrepOptions, outcome: Outcome) -> Outcome:
    def target_of(width: int, height: int) -> tuple[int, int]:
        return choose_size(width, height, options.min_side, options.max_side, options.area)

    def draft_for(width: int, height: int) -> tuple[int, int]:
        return draft_request(width, height, target_of(width, height))

    picture = open_picture(source, options.background, draft_for, options.max_pixels)
    width, height = picture.size
    outcome.original_size = [width, height]
    outcome.warnings.extend(picture.notes)
    if is_small(width, height, options.min_side):
        if not options.upscale:
            outcome.status = "skipped"
            outcome.reason = f"small: {width}×{height} is below --min-side {options.min_side} and upscaling is off"
            return outcome
        outcome.warnings.append(
            f"small: {width}×{height} is below --min-side {options.min_side}, upscaled (blurry pictures "
            "teach blur: upscale it with a proper upscaler first, or pass --no-upscale to leave it out)"
        )
    target = target_of(width, height)
    box = choose_box(picture.image, target, options.crop)
    output = render(picture.image, box, target)
    outcome.pixel_hash = pixel_hash(picture.image)
    outcome.upscaled = (box.right - box.left) < target[0] - 1e-6
    scale = picture.scale
    outcome.crop_box = [round(v / scale, 2) for v in (box.left, box.top, box.right, box.bottom)]
    outcome.output_size = list(target)
    with open(temp_output, "wb") as handle:
        output.save(handle, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        handle.flush()
        os.fsync(handle.fileno())
    outcome.status = "written"
    return outcome
