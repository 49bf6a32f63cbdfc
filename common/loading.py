"""Open any picture a user collected and return clean 8-bit sRGB RGB pixels, or one sentence saying why not.

Phones rotate with EXIF, logos carry alpha, print files are CMYK with ICC profiles, scans are 16-bit and
GIFs are animated. Each of those has a plain Pillow call that does the wrong thing (`convert("RGB")` turns
alpha black and clips 16-bit to white); this module is the one place that does them right. Captioning and
training read images through it too, so all stages see the same pixels.
"""

from __future__ import annotations

import io
import stat
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 178_956_970
"""Pillow's own decompression-bomb limit (2 × its warning threshold); a 16k × 11k scan still passes."""

WHITE = (255, 255, 255)

_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}
_SRGB = ImageCms.createProfile("sRGB")


class PictureError(Exception):
    """A picture that cannot be used; the message is one sentence meant for the user."""


@dataclass
class Picture:
    """A decoded picture: `image` is RGB, upright; `size` is the upright size of the original file.

    `image` may be smaller than `size` when a JPEG was decoded at reduced scale (`scale` < 1).
    """

    image: Image.Image
    size: tuple[int, int]
    notes: list[str] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return self.image.width / self.size[0]


DraftFor = Callable[[int, int], tuple[int, int]]


def open_picture(
    path: Path,
    background: tuple[int, int, int] = WHITE,
    draft_for: DraftFor | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Picture:
    """Decode `path` (read-only) into an upright RGB picture.

    `draft_for(width, height)` may return the smallest size the caller needs for an upright picture of
    that size; JPEGs are then decoded at the smallest DCT scale that still covers it, which is what keeps
    an 8000×6000 photo to a few tens of megabytes.
    """
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a named pipe would block the open forever
            raise PictureError("not a regular file (a folder, pipe, socket or device); not opened")
        if info.st_size == 0:
            raise PictureError("empty file (0 bytes)")
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)
            picture = _decode(image, background, draft_for, max_pixels)
            if image.format == "PNG":
                _check_whole_png(handle)
            return picture
    except PictureError:
        raise
    except UnidentifiedImageError:
        raise PictureError("not a picture (Pillow cannot identify its format)") from None
    except Image.DecompressionBombError as exc:
        raise PictureError(f"decompression bomb refused ({exc})") from None
    except PermissionError:
        raise PictureError("cannot read the file: permission denied") from None
    except FileNotFoundError:
        raise PictureError("cannot read the file: it does not exist (a broken link?)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise PictureError(f"truncated or corrupt image data ({exc})") from None


def _check_whole_png(handle) -> None:
    """OSError unless every chunk is there up to IEND with its checksum right: Pillow decodes a PNG cut
    short after its last pixel rows without a word, but a file cut short is a damaged copy."""
    handle.seek(0)
    try:
        Image.open(handle).verify()  # stops after the IEND chunk's header
    except struct.error:  # a checksum cut off mid-way
        raise OSError("truncated PNG file") from None
    if len(handle.read(4)) < 4:
        raise OSError("truncated PNG file (IEND chunk cut short)")


def picture_size(path: Path) -> tuple[int, int]:
    """The upright size of a picture that decodes; PictureError (empty, not a picture, truncated, unreadable)
    otherwise. The pixels are decoded, since that is what finds a truncated file; JPEGs at a small scale."""
    return open_picture(path, draft_for=lambda width, height: (min(width, 64), min(height, 64))).size


def picture_problem(path: Path) -> str | None:
    """Why `path` is not a usable picture, or None if it opens."""
    try:
        picture_size(path)
    except PictureError as exc:
        return str(exc)
    return None


def _decode(
    image: Image.Image, background: tuple[int, int, int], draft_for: DraftFor | None, max_pixels: int
) -> Picture:
    width, height = image.size
    if width * height > max_pixels:
        raise PictureError(
            f"decompression bomb refused: {width}×{height} = {width * height:,} pixels is over the "
            f"limit of {max_pixels:,} (raise --max-pixels if the picture is genuine)"
        )
    notes: list[str] = []
    if getattr(image, "n_frames", 1) > 1:
        notes.append(f"animated ({image.n_frames} frames): first frame used")
        image.seek(0)
    orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    upright = (height, width) if orientation in _SWAPS_AXES else (width, height)
    if draft_for is not None and image.format == "JPEG":
        need = draft_for(*upright)
        if orientation in _SWAPS_AXES:
            need = (need[1], need[0])
        image.draft(image.mode, need)
    icc = image.info.get("icc_profile")
    image.load()
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    return Picture(_to_srgb(image, icc, background, notes), upright, notes)


def _to_srgb(
    image: Image.Image, icc: bytes | None, background: tuple[int, int, int], notes: list[str]
) -> Image.Image:
    """Any mode → 8-bit RGB: deep modes rescaled, ICC honoured, transparency laid on `background`."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _deep_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("RGB", "L") and "transparency" in image.info:
        image = image.convert("RGBA" if image.mode == "RGB" else "LA")
    elif image.mode == "PA":
        image = image.convert("RGBA")
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA", "RGBa", "La") else None
    if alpha is not None:
        image = image.convert("RGB" if image.mode.startswith("RGB") else "L")
    if icc and image.mode in ("RGB", "L", "CMYK"):
        image = _apply_icc(image, icc, notes)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if alpha is not None and alpha.getextrema()[0] < 255:
        base = Image.new("RGB", rgb.size, background)
        base.paste(rgb, mask=alpha)
        rgb = base
    return rgb


def _deep_to_l(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale to 8 bits by scaling; Pillow's own convert clips everything over 255."""
    low, high = image.getextrema()
    if image.mode == "F":
        scale = 255.0 if high <= 1.0 else 255.0 / max(high, 1e-12)
        return image.point(lambda v: v * scale + 0.5).convert("L")
    image = image.convert("I")
    if high <= 255:
        return image.convert("L")
    scale = 255.0 / 65535.0 if high <= 65535 else 255.0 / high
    return image.point(lambda v: v * scale + 0.5).convert("L")


def _apply_icc(image: Image.Image, icc: bytes, notes: list[str]) -> Image.Image:
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if image.mode == "RGB" and "srgb" in ImageCms.getProfileDescription(profile).lower():
            return image
        return ImageCms.profileToProfile(image, profile, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        notes.append(f"embedded colour profile unusable ({exc}); colours converted without it")
        return image
