"""Draw the example dataset in raw/: the toy world's shapes in "claymation style" (see toy/world.py), saved
with every awkwardness prep handles.

Mixed sizes and orientations, an EXIF-rotated JPEG with an upper-case extension, a transparent PNG, an
animated GIF, a CMYK JPEG, a 16-bit greyscale scan, a picture below the minimum size, a panorama and a
non-ASCII name. Every picture but the scan has a sidecar caption naming its colour and shape, which
caption-folder keeps; the scan has none, so the captioner writes one. The toy base model (toy/base) draws
these shapes flat; scripts/example.sh teaches it the clay look. Run `python datasets_example/make_raw.py`
from the repository root to draw them again.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image

RAW = Path(__file__).resolve().parent / "raw"
sys.path.insert(0, str(RAW.parents[1]))
from toy import world  # noqa: E402


def clay(size: tuple[int, int], seed: int, colour: str, shape: str) -> tuple[Image.Image, str]:
    """A clay shape centred on a plain background of `size`; the shape lies in the central square, which is
    what training crops from any aspect ratio."""
    side = min(size)
    scene = world.random_scene(random.Random(seed), side, colour, shape)
    canvas = Image.new("RGB", size, scene.background)
    canvas.paste(world.draw(scene, style=True), ((size[0] - side) // 2, (size[1] - side) // 2))
    return canvas, scene.caption


def main() -> None:
    RAW.mkdir(exist_ok=True)
    captions = {}

    def save(image: Image.Image, name: str, caption: str | None, **options) -> None:
        image.save(RAW / name, **options)
        if caption:
            captions[name] = caption

    image, text = clay((1024, 768), 1, "red", "circle")
    save(image, "clay_blob_red.jpg", text, quality=90)
    image, text = clay((768, 1024), 2, "blue", "square")
    save(image, "clay_blob_teal.png", text)
    # Stored sideways, shown upright: EXIF orientation 6 means "rotate 90° clockwise to view".
    exif = Image.Exif()
    exif[0x0112] = 6
    image, text = clay((900, 1200), 3, "green", "triangle")
    save(image.transpose(Image.Transpose.ROTATE_90), "clay_snail.JPG", text, format="JPEG", quality=90,
         exif=exif.tobytes())
    scene = world.random_scene(random.Random(4), 800, "yellow", "circle")
    logo = world.draw(scene, style=True).convert("RGBA")
    logo.putalpha(world.shape_mask(scene.shape, scene.box(), 800))
    save(logo, "clay_logo.png", scene.caption)
    image, text = clay((900, 700), 5, "yellow", "square")
    save(image, "clay_cube.webp", text, quality=90)
    frames = [clay((640, 640), 6, "blue", "circle")[0], clay((640, 640), 7, "red", "square")[0]]
    frames = [f.convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    save(frames[0], "clay_palette.gif", "a blue circle", save_all=True, append_images=frames[1:], duration=200, loop=0)
    image, text = clay((400, 300), 8, "red", "triangle")
    save(image, "clay_tiny.png", text)
    image, text = clay((1000, 1000), 9, "green", "circle")
    save(image, "pâte_à_modeler.jpg", text, quality=90)
    scan = clay((700, 900), 10, "blue", "triangle")[0].convert("L")
    wide = b"".join((v * 257).to_bytes(2, "big") for v in scan.tobytes())
    save(Image.frombytes("I;16B", scan.size, wide), "clay_scan.png", None)
    image, text = clay((1100, 800), 11, "green", "square")
    save(image.convert("CMYK"), "clay_print.jpg", text, quality=90)
    image, text = clay((1600, 600), 12, "yellow", "triangle")
    save(image, "clay_wide.png", text)
    for name, text in captions.items():
        (RAW / name).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
