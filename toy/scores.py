"""Pixel metrics for the toy world: does a picture show the prompted colour and shape, and how much clay
shading does it carry. No model is involved, so the scores mean the same for every model and run.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image

from toy.world import COLOURS, SHAPES, shape_mask

MIN_IOU = 0.6
"""Below this, the best-fitting ideal shape does not describe the blob: the picture shows no clear shape."""


@dataclass(frozen=True)
class Reading:
    colour: str | None
    shape: str | None
    iou: float
    mask: np.ndarray

    def matches(self, colour: str, shape: str) -> bool:
        return self.colour == colour and self.shape == shape and self.iou >= MIN_IOU


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def foreground(pixels: np.ndarray, threshold: float = 0.18) -> np.ndarray:
    """Pixels that differ from the background, whose colour is the median of the picture's border."""
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    return np.linalg.norm(pixels - background, axis=2) > threshold


def hue_name(pixels: np.ndarray, mask: np.ndarray) -> str | None:
    """The palette colour nearest to the saturation-weighted circular mean hue of the shape's pixels."""
    chosen = pixels[mask]
    if len(chosen) == 0:
        return None
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in chosen])
    weight = hsv[:, 1] * hsv[:, 2]
    if weight.sum() < 1e-6:
        return None
    angle = hsv[:, 0] * 2 * np.pi
    mean = np.degrees(np.arctan2((weight * np.sin(angle)).sum(), (weight * np.cos(angle)).sum())) % 360
    return min(COLOURS, key=lambda name: abs((mean - COLOURS[name] + 180) % 360 - 180))


def best_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """The ideal shape (as `world` draws them) fitted to the mask's bounding box with the highest IoU."""
    ys, xs = np.nonzero(mask)
    if not 0.02 * mask.size <= len(xs) <= 0.6 * mask.size:  # the toy world's shapes cover 2-50 %
        return None, 0.0
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    scores = {}
    for shape in SHAPES:
        ideal = np.asarray(shape_mask(shape, box, mask.shape[0], scale=1)) > 127
        scores[shape] = (ideal & mask).sum() / max(1, (ideal | mask).sum())
    shape = max(scores, key=scores.get)
    return shape, float(scores[shape])


def read(image: Image.Image) -> Reading:
    pixels = _rgb(image)
    mask = foreground(pixels)
    shape, iou = best_shape(mask)
    return Reading(hue_name(pixels, mask), shape, iou, mask)


def content_accuracy(samples: list[tuple[Image.Image, str, str]]) -> float:
    """Share (0–1) of `(picture, colour, shape)` samples that show the prompted colour and shape."""
    return sum(read(image).matches(colour, shape) for image, colour, shape in samples) / max(1, len(samples))


def style_score(image: Image.Image) -> float:
    """Clay shading strength: how much brighter the shape's top-left is than its bottom-right.

    A plane is fitted to the luminance inside the shape (its edge pixels left out) over coordinates scaled
    to its bounding box; the score is the fitted drop along the light's diagonal, in units of the shape's
    mean luminance. Flat fills score about 0, whatever their colour; noise averages out; the clay pictures
    of `world.draw(..., style=True)` score about 1. Pictures without a shape score 0.
    """
    pixels = _rgb(image)
    mask = foreground(pixels)
    inner = mask.copy()
    for axis in (0, 1):
        for shift in (1, -1):
            inner &= np.roll(mask, shift, axis=axis)
    ys, xs = np.nonzero(inner)
    if len(xs) < 30:
        return 0.0
    luminance = pixels[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    values = luminance[ys, xs]
    u = (xs - xs.mean()) / max(1.0, (xs.max() - xs.min()) / 2)
    v = (ys - ys.mean()) / max(1.0, (ys.max() - ys.min()) / 2)
    design = np.stack([np.ones_like(u), u, v], axis=1)
    (_, slope_x, slope_y), *_ = np.linalg.lstsq(design, values, rcond=None)
    return float(-(slope_x + slope_y) / max(1e-3, values.mean()))
