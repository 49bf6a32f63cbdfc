"""Where to cut: the crop modes offered to users, and the training-size image they produce."""

from __future__ import annotations

from PIL import Image, ImageFilter

from lorasmith.common.sizing import Box, best_window, crop_box

CROP_MODES = ("center", "top", "detail")
CROP_HELP = (
    "center: keep the middle (right for centred subjects and most datasets). "
    "top: keep the top of tall pictures (portraits and full-body shots whose head would be cut by a centre "
    "crop); wide pictures are still centred. "
    "detail: keep the window with the most edges (subject off-centre on a plain or blurred background, "
    "product shots, icons); slower, and it can favour busy clutter over a smooth subject."
)

_PREVIEW = 256
"""Edge energy is measured on a preview this big: plenty to place a window, and cheap on any photo."""


def choose_box(image: Image.Image, target: tuple[int, int], mode: str) -> Box:
    """The region of `image` (its own pixel coordinates) that becomes the `target`-sized output."""
    if mode not in CROP_MODES:
        raise ValueError(f"unknown crop mode {mode!r}; choose one of {', '.join(CROP_MODES)}")
    centred = crop_box(image.width, image.height, target, 0.5)
    tall_crop = centred.top > 0 or centred.bottom < image.height
    if mode == "center" or centred == Box(0.0, 0.0, float(image.width), float(image.height)):
        return centred
    if mode == "top":
        return crop_box(image.width, image.height, target, 0.0 if tall_crop else 0.5)
    return crop_box(image.width, image.height, target, _detail_offset(image, centred, tall_crop))


def _detail_offset(image: Image.Image, centred: Box, tall_crop: bool) -> float:
    preview = image.convert("L")
    preview.thumbnail((_PREVIEW, _PREVIEW), Image.Resampling.BILINEAR)
    edges = preview.filter(ImageFilter.FIND_EDGES)
    w, h = edges.size
    data = edges.tobytes()
    if tall_crop:
        profile = [float(sum(data[y * w : (y + 1) * w])) for y in range(h)]
        window = round((centred.bottom - centred.top) / image.height * h)
    else:
        profile = [float(sum(data[x::w])) for x in range(w)]
        window = round((centred.right - centred.left) / image.width * w)
    # FIND_EDGES lights up the border pixels of the preview itself; they are not content.
    if len(profile) > 2:
        profile[0] = profile[-1] = 0.0
    spare = len(profile) - window
    if spare <= 0:
        return 0.5
    return best_window(profile, window) / spare


def render(image: Image.Image, box: Box, target: tuple[int, int]) -> Image.Image:
    """Crop and resize in one Lanczos pass; Pillow first box-reduces by whole factors, so big inputs stay cheap."""
    return image.resize(
        target,
        Image.Resampling.LANCZOS,
        box=(box.left, box.top, box.right, box.bottom),
        reducing_gap=3.0,
    )
