"""Draw the example dataset in raw/: procedural "claymation" pictures with every awkwardness prep handles.

Mixed sizes and orientations, an EXIF-rotated JPEG with an upper-case extension, a transparent PNG, an
animated GIF, a CMYK JPEG, a 16-bit greyscale scan, a picture below the minimum size, a panorama, a
non-ASCII name and a sidecar caption. Run `python datasets_example/make_raw.py` to draw them again.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

RAW = Path(__file__).resolve().parent / "raw"


def backdrop(size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    mask = Image.linear_gradient("L").resize(size)
    return Image.composite(Image.new("RGB", size, bottom), Image.new("RGB", size, top), mask)


def blob(canvas: Image.Image, box: tuple[int, int, int, int], colour: tuple[int, int, int], rng: random.Random) -> None:
    """A soft clay lump: a shaded ellipse with a highlight, a shadow and thumb-print dents."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    shadow = Image.new("L", canvas.size, 0)
    ImageDraw.Draw(shadow).ellipse((x0 + w // 10, y1 - h // 8, x1 + w // 10, y1 + h // 8), fill=110)
    canvas.paste((30, 25, 20), mask=shadow.filter(ImageFilter.GaussianBlur(max(2, w // 15))))
    light = tuple(min(255, c + 70) for c in colour)
    dark = tuple(max(0, c - 80) for c in colour)
    shade = Image.radial_gradient("L").resize((w, h))
    body = Image.composite(Image.new("RGB", (w, h), dark), Image.new("RGB", (w, h), light), shade)
    draw = ImageDraw.Draw(body)
    for _ in range(6):
        cx, cy, r = rng.randrange(w), rng.randrange(h), rng.randrange(max(3, w // 20), max(4, w // 8))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(max(0, c - 35) for c in colour))
    body = body.filter(ImageFilter.GaussianBlur(max(1, w // 60)))
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).ellipse((0, 0, w - 1, h - 1), fill=255)
    canvas.paste(body, (x0, y0), mask.filter(ImageFilter.GaussianBlur(1)))


def scene(size: tuple[int, int], seed: int, colours: list[tuple[int, int, int]]) -> Image.Image:
    rng = random.Random(seed)
    canvas = backdrop(size, (236, 226, 206), (170, 150, 120))
    w, h = size
    for colour in colours:
        bw, bh = rng.randrange(w // 5, w // 2), rng.randrange(h // 5, h // 2)
        x, y = rng.randrange(0, w - bw), rng.randrange(h // 4, h - bh)
        blob(canvas, (x, y, x + bw, y + bh), colour, rng)
    return canvas


def main() -> None:
    RAW.mkdir(exist_ok=True)
    red, teal, yellow, purple = (200, 60, 50), (40, 150, 150), (230, 190, 60), (120, 70, 160)
    scene((1024, 768), 1, [red, yellow]).save(RAW / "clay_blob_red.jpg", quality=88)
    (RAW / "clay_blob_red.txt").write_text("a red and a yellow clay blob on a table\n", encoding="utf-8")
    scene((768, 1024), 2, [teal]).save(RAW / "clay_blob_teal.png")
    # Stored sideways, shown upright: EXIF orientation 6 means "rotate 90° clockwise to view".
    exif = Image.Exif()
    exif[0x0112] = 6
    scene((900, 1200), 3, [purple, red]).transpose(Image.Transpose.ROTATE_90).save(
        RAW / "clay_snail.JPG", format="JPEG", quality=88, exif=exif.tobytes()
    )
    logo = Image.new("RGBA", (800, 800), (0, 0, 0, 0))
    blob(logo, (150, 150, 650, 600), yellow, random.Random(4))
    logo.save(RAW / "clay_logo.png")
    scene((900, 700), 5, [teal, yellow, red]).save(RAW / "clay_cube.webp", quality=85)
    frames = [scene((640, 640), 6 + i, [purple]).convert("P", palette=Image.Palette.ADAPTIVE) for i in range(2)]
    frames[0].save(RAW / "clay_palette.gif", save_all=True, append_images=frames[1:], duration=200, loop=0)
    scene((400, 300), 8, [red]).save(RAW / "clay_tiny.png")
    scene((1000, 1000), 9, [yellow, teal]).save(RAW / "pâte_à_modeler.jpg", quality=88)
    scan = scene((700, 900), 10, [purple]).convert("L")
    wide = b"".join((v * 257).to_bytes(2, "big") for v in scan.tobytes())
    Image.frombytes("I;16B", scan.size, wide).save(RAW / "clay_scan.png")
    scene((1100, 800), 11, [red, teal]).convert("CMYK").save(RAW / "clay_print.jpg", quality=88)
    scene((1600, 600), 12, [yellow, purple, teal]).save(RAW / "clay_wide.png")


if __name__ == "__main__":
    main()
