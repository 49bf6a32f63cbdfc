"""Shared fixtures: an image factory for any size, mode, format, EXIF rotation, ICC profile or animation."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent


def pattern(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """An RGB test card: a gradient with a seed-dependent circle, so distinct seeds give distinct pixels."""
    width, height = size
    gradient = Image.linear_gradient("L").resize((width, height))
    image = Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.ROTATE_90).resize(size), gradient))
    draw = ImageDraw.Draw(image)
    r = max(2, min(size) // 5)
    cx, cy = (seed * 37) % max(1, width - 2 * r) + r, (seed * 53) % max(1, height - 2 * r) + r
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=((seed * 70) % 256, 40, 200))
    return image


def make_image(
    path: Path,
    size: tuple[int, int] = (640, 480),
    mode: str = "RGB",
    fmt: str | None = None,
    seed: int = 0,
    exif_orientation: int | None = None,
    icc: bytes | None = None,
    frames: int = 1,
    **save: object,
) -> Path:
    """Write a picture of the given stored size and mode; `fmt` defaults from the suffix."""
    base = pattern(size, seed)
    if mode in ("RGBA", "LA"):
        alpha = Image.new("L", size, 0)
        ImageDraw.Draw(alpha).rectangle((size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4), 255)
        image = base.convert("RGBA")
        image.putalpha(alpha)
        image = image.convert(mode)
    elif mode == "I;16":
        grey = base.convert("L")
        wide = b"".join((v * 257).to_bytes(2, "little") for v in grey.tobytes())
        image = Image.frombytes("I;16", size, wide)
    else:
        image = base.convert(mode)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        save["exif"] = exif.tobytes()
    if icc is not None:
        save["icc_profile"] = icc
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames > 1:
        extra = [pattern(size, seed + i + 1).convert(image.mode) for i in range(frames - 1)]
        save.update(save_all=True, append_images=extra)
    image.save(path, format=fmt, **save)
    return path


def swapped_primaries_icc() -> bytes:
    """A minimal ICC v2 RGB profile whose red and blue primaries are swapped.

    A pure-red pixel tagged with it is blue in sRGB, so a test can tell whether the profile was honoured.
    """
    import struct

    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(2.2 * 256)) + bytes(2)
    text = b"swapped primaries\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    desc += bytes(-len(desc) % 4)
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.1431, 0.0606, 0.7141)),  # sRGB's blue, D50-adapted
        (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)),
        (b"bXYZ", xyz(0.4361, 0.2225, 0.0139)),  # sRGB's red
        (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    body = struct.pack(">I", len(tags)) + table + data
    header = bytearray(128)
    header[0:4] = struct.pack(">I", 128 + len(body))
    header[8:12] = bytes([2, 0x10, 0, 0])
    header[12:16], header[16:20], header[20:24] = b"mntr", b"RGB ", b"XYZ "
    header[36:40] = b"acsp"
    header[68:80] = s15(0.9642) + s15(1.0) + s15(0.8249)
    return bytes(header) + body


@pytest.fixture
def image_factory(tmp_path: Path):
    """`image_factory("raw/a.jpg", size=(800, 600), mode="CMYK")` writes a picture under tmp_path."""

    def factory(rel: str, **kwargs) -> Path:
        return make_image(tmp_path / rel, **kwargs)

    return factory


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    """A random-weight BLIP folder built from a config (no download), shared by the whole session."""
    from lorasmith.models.tiny_blip import build_blip

    return build_blip(tmp_path_factory.mktemp("tiny-blip"))


def training_root(root: Path, folders: dict[str, int]) -> Path:
    """A Kohya training root: {'10_clay': 3} makes 10_clay/ with three distinct 96×64 PNGs."""
    for name, count in folders.items():
        for i in range(count):
            make_image(root / name / f"img{i}.png", size=(96, 64), seed=i + 10 * len(name))
    return root


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A random-weight Stable Diffusion folder (diffusers layout) built from configs, shared by the session."""
    from lorasmith.models.tiny import build_sd

    return build_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_xl(tmp_path_factory) -> Path:
    """A random-weight SDXL base folder (two text encoders, CLIP's real tokenizers), shared by the session."""
    from lorasmith.models.tiny import build_sd

    return build_sd(tmp_path_factory.mktemp("tiny-xl"), "tiny-xl")


def small_dataset(root: Path, images: int = 3, repeats: int = 10, size=(128, 128), captions: bool = True) -> Path:
    """A training root with one repeat folder of distinct pictures and (optionally) captions."""
    folder = root / f"{repeats}_clay"
    for i in range(images):
        make_image(folder / f"img{i}.png", size=size, seed=i + 1)
        if captions:
            (folder / f"img{i}.txt").write_text(f"claymation style, blob {i}", encoding="utf-8")
    return root


def write_preset(path: Path, base: Path, data: Path, out: Path, **sections: dict) -> Path:
    """A preset for the tiny model: 128 px buckets, small rank, AdamW; `sections` override per section."""
    import toml

    preset = {
        "config_version": 1,
        "model": {"pretrained_model": str(base)},
        "dataset": {"train_data_dir": str(data), "resolution": 128, "min_bucket_reso": 64, "max_bucket_reso": 256},
        "network": {"network_dim": 4, "network_alpha": 2},
        "optimizer": {"optimizer_type": "AdamW", "learning_rate": 1e-3},
        "training": {"max_train_steps": 4, "train_batch_size": 2},
        "output": {"output_dir": str(out), "output_name": "test", "save_precision": "float"},
    }
    for section, values in sections.items():
        preset.setdefault(section, {}).update(values)
    path.write_text(toml.dumps(preset), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory) -> Path:
    """A random-weight Flux.1 dev folder (two double and two single blocks, tiny CLIP and T5), shared by the
    session."""
    from lorasmith.models.tiny import build_sd

    return build_sd(tmp_path_factory.mktemp("tiny-flux"), "tiny-flux")
