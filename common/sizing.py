"""Pure arithmetic of stage 1a: which training size a picture gets, where it is cropped, how often it repeats.

Nothing here touches a file, so every rule is tested from a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STEP = 64
"""SD's VAE downsamples by 8 and the UNet by a further 8: sides that are multiples of 64 need no padding."""


@dataclass(frozen=True)
class Box:
    """A crop rectangle in the source picture's pixel coordinates (floats: Pillow resamples sub-pixel boxes)."""

    left: float
    top: float
    right: float
    bottom: float

    def as_list(self) -> list[float]:
        return [round(v, 2) for v in (self.left, self.top, self.right, self.bottom)]


def candidate_sizes(min_side: int = 512, max_side: int = 768, step: int = STEP, area: int | None = None
                    ) -> list[tuple[int, int]]:
    """Every (width, height) whose sides are multiples of `step` within [min_side, max_side].

    With `area` (SDXL: 1024), as Kohya's SDXL buckets: for each side, the largest other side that keeps the
    product within area², and the transposes. Every size then uses nearly the whole area, so a 16:9 photo
    trains at 1344×768 rather than at an exactly 16:9 but much smaller 1024×576.
    """
    if min_side <= 0 or max_side < min_side:
        raise ValueError(f"need 0 < min_side <= max_side, got {min_side}, {max_side}")
    lo = math.ceil(min_side / step) * step
    hi = (max_side // step) * step
    if lo > hi:
        raise ValueError(f"no multiple of {step} lies between {min_side} and {max_side}")
    sides = range(lo, hi + 1, step)
    if area is None:
        return [(w, h) for w in sides for h in sides]
    tallest = {w: max((h for h in sides if w * h <= area * area), default=None) for w in sides}
    pairs = {(w, h) for w, h in tallest.items() if h is not None}
    sizes = sorted(pairs | {(h, w) for w, h in pairs})
    if not sizes:
        raise ValueError(f"no size with sides of at least {lo} has an area of at most {area}²: lower --min-side "
                         "or raise --area")
    return sizes


def choose_size(width: int, height: int, min_side: int = 512, max_side: int = 768,
                area: int | None = None) -> tuple[int, int]:
    """The training size for a `width`×`height` picture.

    The closest aspect ratio wins (compared in log space, so 2:1 and 1:2 are equally far from 1:1), which
    keeps the crop as small as it can be. Sizes with the same ratio (512², 576², … 768² for a square) are
    ties: the largest the picture covers without upscaling wins, and a picture too small for any of them
    gets the smallest, so nothing is enlarged more than the bounds force.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"picture size must be positive, got {width}x{height}")
    ratio = math.log(width / height)

    def key(size: tuple[int, int]) -> tuple[float, int, int]:
        w, h = size
        error = round(abs(math.log(w / h) - ratio), 9)
        covers = w <= width and h <= height
        return (error, 0 if covers else 1, -(w * h) if covers else w * h)

    return min(candidate_sizes(min_side, max_side, area=area), key=key)


def is_small(width: int, height: int, min_side: int = 512) -> bool:
    """A picture is small when its shorter side is below the minimum: it can only be used upscaled."""
    return min(width, height) < min_side


def cover_scale(width: int, height: int, target: tuple[int, int]) -> float:
    """The scale at which the picture just covers `target` (crop the rest); above 1 means upscaling."""
    tw, th = target
    return max(tw / width, th / height)


def crop_box(width: int, height: int, target: tuple[int, int], offset: float = 0.5) -> Box:
    """The region of the source with the target's aspect ratio, placed along the cropped axis.

    `offset` runs from 0 (left/top edge) to 1 (right/bottom edge); 0.5 is a centre crop.
    """
    if not 0.0 <= offset <= 1.0:
        raise ValueError(f"offset must lie in [0, 1], got {offset}")
    tw, th = target
    if width * th >= height * tw:  # source is wider than the target: crop left/right
        keep = height * tw / th
        left = (width - keep) * offset
        return Box(left, 0.0, left + keep, float(height))
    keep = width * th / tw
    top = (height - keep) * offset
    return Box(0.0, top, float(width), top + keep)


def best_window(profile: list[float], window: int) -> int:
    """Start index of the `window`-long run of `profile` with the largest sum (first one on ties).

    Used by the detail-aware crop: `profile` is edge energy per column (or row) of a small preview.
    """
    n = len(profile)
    if window >= n:
        return 0
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(profile[:window])
    best, best_start = total, 0
    for start in range(1, n - window + 1):
        total += profile[start + window - 1] - profile[start - 1]
        if total > best + 1e-12:
            best, best_start = total, start
    return best_start


def auto_repeats(n_images: int, min_repeats: int = 100, min_views: int = 1500) -> int:
    """Kohya's usual guidance: each image seen at least 100 times and at least 1,500 views per epoch in all."""
    if n_images <= 0:
        return min_repeats
    return max(min_repeats, math.ceil(min_views / n_images))


def draft_request(width: int, height: int, target: tuple[int, int], headroom: float = 2.0) -> tuple[int, int]:
    """The smallest decode size worth asking a JPEG decoder for: `headroom`× the covering size.

    Decoding an 8000×6000 JPEG at 1/4 scale costs 1/16 of the memory; keeping 2× headroom over the final
    size lets the Lanczos filter still see real detail, so quality matches a full decode.
    """
    scale = min(1.0, cover_scale(width, height, target) * headroom)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))
