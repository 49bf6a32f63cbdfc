"""The toy world: one coloured shape on a plain background, drawn flat (what the base model learns) or in
clay (the style a LoRA must teach it).

Everything is seeded numpy + Pillow, so the same seed gives the same picture on any machine. Shapes are
drawn at 4× and downsampled, so their edges are antialiased the way real pictures are.
"""

from __future__ import annotations

import colorsys
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
COLOURS = {"red": 0.0, "yellow": 55.0, "green": 125.0, "blue": 220.0}
"""Colour word → hue in degrees; at least 55° apart, so a sampled hue names one colour only."""
SHAPES = ("circle", "square", "triangle")
TRIGGER = "claymation style"
OVERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """What one picture shows, in pixels of a `size`-square picture."""

    colour: str
    shape: str
    centre: tuple[float, float]
    radius: float
    """Half the shape's bounding-box side."""
    rgb: tuple[int, int, int]
    background: tuple[int, int, int]
    size: int = SIZE

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape)

    def box(self) -> tuple[float, float, float, float]:
        (x, y), r = self.centre, self.radius
        return x - r, y - r, x + r, y + r


def caption(colour: str, shape: str, style: bool = False) -> str:
    text = f"a {colour} {shape}"
    return f"{TRIGGER}, {text}" if style else text


def random_scene(rng: random.Random, size: int = SIZE, colour: str | None = None, shape: str | None = None) -> Scene:
    """A shape of a random size and place, with small colour and background variations: enough variety that
    a model must read the caption, not memorise a dozen pictures."""
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    radius = size * rng.uniform(0.22, 0.34)
    jitter = size * 0.12
    centre = (size / 2 + rng.uniform(-jitter, jitter), size / 2 + rng.uniform(-jitter, jitter))
    hue = (COLOURS[colour] + rng.uniform(-6, 6)) % 360
    rgb = colorsys.hsv_to_rgb(hue / 360, rng.uniform(0.7, 0.9), rng.uniform(0.75, 0.95))
    grey = rng.uniform(0.82, 0.95)
    tint = [grey + rng.uniform(-0.02, 0.02) for _ in range(3)]
    return Scene(colour, shape, centre, radius, tuple(round(255 * c) for c in rgb),
                 tuple(round(255 * c) for c in tint), size)


def shape_mask(shape: str, box: tuple[float, float, float, float], size: int, scale: int = OVERSAMPLE) -> Image.Image:
    """The ideal shape filling `box` as an 8-bit mask of `size` pixels (antialiased when `scale` > 1).
    Triangles stand on their base, apex up; the metric in `scores.py` fits the same three shapes."""
    big = Image.new("L", (size * scale, size * scale), 0)
    x0, y0, x1, y1 = (v * scale for v in box)
    draw = ImageDraw.Draw(big)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return big.resize((size, size), Image.Resampling.BOX) if scale > 1 else big


def clay_shading(mask: np.ndarray, radius: float) -> np.ndarray:
    """Brightness factors for a puffy clay body lit from the top left: a height field that rises from the
    shape's edge (the mask blurred), Lambert light on its normals and a soft highlight.

    Smooth on purpose: a VAE that downsamples keeps smooth shading and loses fine texture.
    """
    blur = max(1.0, radius * 0.45)
    height = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur)),
                        dtype=np.float32) / 255
    height = height * mask
    gy, gx = np.gradient(height * radius * 1.6)
    normal = np.stack([-gx, -gy, np.ones_like(gx)])
    normal /= np.linalg.norm(normal, axis=0, keepdims=True)
    light = np.array([-0.55, -0.55, 0.63])
    light /= np.linalg.norm(light)
    lambert = np.clip(np.tensordot(light, normal, axes=1), 0, 1)
    highlight = np.clip(lambert, 0, 1) ** 12
    return 0.35 + 0.85 * lambert + 0.35 * highlight


def draw(scene: Scene, style: bool = False) -> Image.Image:
    """The scene as an RGB picture: flat fill, or clay shading when `style`."""
    mask = np.asarray(shape_mask(scene.shape, scene.box(), scene.size), dtype=np.float32) / 255
    colour = np.array(scene.rgb, dtype=np.float32) / 255
    if style:
        body = colour[:, None, None] * clay_shading(mask, scene.radius)[None]
        body = np.clip(body, 0, 1)
    else:
        body = np.broadcast_to(colour[:, None, None], (3, scene.size, scene.size))
    background = np.array(scene.background, dtype=np.float32)[:, None, None] / 255
    pixels = body * mask[None] + background * (1 - mask[None])
    return Image.fromarray(np.round(pixels.transpose(1, 2, 0) * 255).astype(np.uint8), "RGB")


def pictures(seed: int, count: int, style: bool = False, size: int = SIZE) -> list[tuple[Image.Image, Scene]]:
    """`count` pictures cycling through every colour × shape pair, so a small set still covers them all."""
    rng = random.Random(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    rng.shuffle(pairs)
    scenes = [random_scene(rng, size, *pairs[i % len(pairs)]) for i in range(count)]
    return [(draw(scene, style), scene) for scene in scenes]
