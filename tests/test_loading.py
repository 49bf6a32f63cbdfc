"""The loader against every awkward kind of picture users bring."""

from pathlib import Path

import pytest
from PIL import Image

from conftest import make_image, swapped_primaries_icc
from lorasmith.common.loading import PictureError, open_picture


def marker_image(path: Path, orientation: int) -> Path:
    """A 300×200 picture stored so that, shown upright per `orientation`, its red corner is top-left."""
    upright = Image.new("RGB", (300, 200), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 30, 30))
    inverse = {
        1: None,
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    stored = upright.transpose(inverse) if inverse is not None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, format="PNG", exif=exif.tobytes())
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    picture = open_picture(marker_image(tmp_path / f"o{orientation}.png", orientation))
    assert picture.size == (300, 200)
    assert picture.image.size == (300, 200)
    assert picture.image.getpixel((5, 5)) == (255, 0, 0)
    assert picture.image.getpixel((295, 195)) == (0, 0, 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
@pytest.mark.parametrize("background", [(255, 255, 255), (0, 128, 0)])
def test_transparency_lies_on_the_background(tmp_path, mode, background):
    path = make_image(tmp_path / "a.png", size=(200, 200), mode=mode)
    picture = open_picture(path, background=background)
    assert picture.image.mode == "RGB"
    assert picture.image.getpixel((5, 5)) == background  # transparent corner
    inside = picture.image.getpixel((100, 100))
    assert inside != background  # the opaque middle keeps its colour


def test_palette_transparency(tmp_path):
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.paste(1, (16, 16, 48, 48))
    path = tmp_path / "p.gif"
    image.save(path, transparency=0)
    picture = open_picture(path)
    assert picture.image.getpixel((0, 0)) == (255, 255, 255)
    assert picture.image.getpixel((32, 32)) == (200, 30, 30)


@pytest.mark.parametrize(
    "mode, fmt", [("CMYK", "JPEG"), ("CMYK", "TIFF"), ("I;16", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGB", "WEBP")]
)
def test_every_mode_becomes_rgb_with_the_same_look(tmp_path, mode, fmt):
    path = make_image(tmp_path / f"x.{fmt.lower()}", size=(160, 120), mode=mode, fmt=fmt, quality=95)
    picture = open_picture(path)
    assert picture.image.mode == "RGB" and picture.image.size == (160, 120)
    source = make_image(tmp_path / "ref.png", size=(160, 120))
    grey = mode in ("I;16", "L")
    # what the picture holds, in 8-bit RGB: the pattern itself (grey for grey modes, the palette's
    # approximation for P); never the clipped white a naive 16-bit convert gives
    expected = Image.open(path).convert("RGB") if mode == "P" else Image.open(source).convert("L" if grey else "RGB")
    expected = expected.convert("RGB")
    diff = sum(abs(a - b) for a, b in zip(picture.image.tobytes(), expected.tobytes())) / (160 * 120 * 3)
    assert diff < 6, diff


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    wide = Image.frombytes("I;16", (2, 1), (1000).to_bytes(2, "little") + (60000).to_bytes(2, "little"))
    wide.save(tmp_path / "deep.png")
    picture = open_picture(tmp_path / "deep.png")
    assert picture.image.getpixel((0, 0)) == (4, 4, 4)  # 1000 / 257 ≈ 3.9, rounded
    assert picture.image.getpixel((1, 0)) == (233, 233, 233)  # 60000 / 257 ≈ 233.5


def test_embedded_icc_profile_is_honoured(tmp_path):
    path = tmp_path / "tagged.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(path, icc_profile=swapped_primaries_icc())
    r, g, b = open_picture(path).image.getpixel((0, 0))
    assert b > 200 and r < 60  # "red" in a profile with swapped primaries is blue in sRGB


def test_animated_picture_uses_its_first_frame(tmp_path):
    path = make_image(tmp_path / "anim.gif", size=(64, 64), mode="P", frames=3, seed=1)
    first = Image.open(path).convert("RGB")
    picture = open_picture(path)
    assert picture.image.tobytes() == first.tobytes()
    assert picture.notes == ["animated (3 frames): first frame used"]


def test_big_jpeg_is_decoded_at_reduced_scale(tmp_path):
    path = make_image(tmp_path / "big.jpg", size=(4000, 3000), quality=80)
    picture = open_picture(path, draft_for=lambda w, h: (w // 5, h // 5))
    assert picture.size == (4000, 3000)
    assert picture.image.size == (1000, 750)  # the 1/4 DCT scale is the smallest that covers 800×600
    assert picture.scale == 0.25


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", r"empty file \(0 bytes\)"),
        (b"hello, not a picture", "not a picture"),
    ],
)
def test_bad_bytes(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(PictureError, match=reason):
        open_picture(path)


def test_truncated_picture(tmp_path):
    path = make_image(tmp_path / "t.png", size=(400, 400))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PictureError, match="truncated or corrupt"):
        open_picture(path)


def test_decompression_bomb(tmp_path):
    path = make_image(tmp_path / "bomb.png", size=(300, 300))
    with pytest.raises(PictureError, match="decompression bomb refused: 300×300 = 90,000 pixels"):
        open_picture(path, max_pixels=10_000)
