"""The training set on disk: Kohya repeat folders (or a diffusers metadata.jsonl folder), captions, buckets.

Reading follows prep's layout rules (imported from prep, which owns them); pixels come through prep's
loader, so training sees exactly what prep wrote and what the captioner saw.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from lorasmith.prep.crop import render
from lorasmith.prep.files import sha256_file
from lorasmith.prep.layout import iter_images, repeat_folders
from lorasmith.prep.loading import open_picture
from lorasmith.prep.sizing import crop_box
from lorasmith.train.plan import assign_bucket


class DatasetError(ValueError):
    """The dataset folder cannot be used as it is; the message says what to change."""


@dataclass(frozen=True)
class Item:
    """One picture with its caption; `repeats` copies of it make up an epoch."""

    image: Path
    caption: str
    repeats: int
    bucket: tuple[int, int]
    is_reg: bool = False
    content: str = ""
    """sha256 of the file, so a cached latent is never used for a changed picture."""


@dataclass
class Dataset:
    items: list[Item]
    reg_items: list[Item]
    warnings: list[str]
    folders: dict[str, int]
    """Folder name → repeats, for the ss_dataset_dirs metadata."""
    validation: list[Item] = field(default_factory=list)
    """Pictures held out of training for the validation loss."""

    def bucket_counts(self, reg: bool = False) -> dict[tuple[int, int], int]:
        counts: dict[tuple[int, int], int] = {}
        for item, n in self.epoch_items(reg):
            counts[item.bucket] = counts.get(item.bucket, 0) + n
        return counts

    def epoch_items(self, reg: bool = False) -> list[tuple[Item, int]]:
        """(item, times per epoch). Regularisation images are repeated or cut to match the training views,
        as Kohya does, so they weigh as much as the training set."""
        if not reg:
            return [(item, item.repeats) for item in self.items]
        if not self.reg_items:
            return []
        wanted = sum(item.repeats for item in self.items)
        cycle = itertools.islice(itertools.cycle(self.reg_items), wanted)
        counts: dict[Item, int] = {}
        for item in cycle:
            counts[item] = counts.get(item, 0) + 1
        return list(counts.items())


def _caption(image: Path, extension: str, fallback: str, warnings: list[str]) -> str:
    sidecar = image.with_suffix(extension)
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            return text
    warnings.append(f"{image.name}: no caption ({sidecar.name}); using the folder's tokens {fallback!r}")
    return fallback


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size  # prep's outputs are upright; other pictures are made upright when loaded


def read_folder(root: Path, extension: str, buckets: list[tuple[int, int]], is_reg: bool = False
                ) -> tuple[list[Item], list[str], dict[str, int]]:
    warnings: list[str] = []
    items: list[Item] = []
    folders: dict[str, int] = {}
    metadata = root / "metadata.jsonl"
    if metadata.is_file():
        for n, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                path, text = root / row["file_name"], str(row.get("text", ""))
            except (ValueError, KeyError, TypeError):
                raise DatasetError(f"{metadata}:{n}: each line must be JSON with file_name and text") from None
            if not path.is_file():
                warnings.append(f"{metadata.name}:{n}: {row['file_name']} does not exist; left out")
                continue
            items.append(Item(path, text, 1, assign_bucket(_size(path), buckets), is_reg, sha256_file(path)))
        folders[root.name] = 1
        return items, warnings, folders
    found = repeat_folders(root)
    if not found:
        raise DatasetError(f"{root} holds no <repeats>_<name> folders (like 100_clay) and no metadata.jsonl: "
                           "point it at the --out folder of prep-images")
    for folder in found:
        folders[folder.path.name] = folder.repeats
        for image in iter_images(folder.path):
            caption = _caption(image, extension, folder.tokens, warnings)
            items.append(Item(image, caption, folder.repeats, assign_bucket(_size(image), buckets), is_reg,
                              sha256_file(image)))
    if not items:
        raise DatasetError(f"{root}: the repeat folders hold no pictures")
    return items, warnings, folders


def load_dataset(train_dir: Path, reg_dir: Path | None, extension: str, buckets: list[tuple[int, int]]) -> Dataset:
    items, warnings, folders = read_folder(train_dir, extension, buckets)
    reg_items: list[Item] = []
    if reg_dir is not None:
        reg_items, reg_warnings, _ = read_folder(reg_dir, extension, buckets, is_reg=True)
        warnings += reg_warnings
    return Dataset(items, reg_items, warnings, folders)


def load_pixels(item: Item, flip: bool = False) -> Image.Image:
    """The item's picture at its bucket size: resized to cover and centre-cropped (a no-op for prep's outputs)."""
    image = open_picture(item.image).image
    if image.size != item.bucket:
        image = render(image, crop_box(image.width, image.height, item.bucket), item.bucket)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def process_caption(caption: str, shuffle: bool, keep_tokens: int, dropout: float, rng: random.Random) -> str:
    """Kohya's caption augmentations: drop the whole caption with probability `dropout`, otherwise shuffle the
    comma-separated tokens after the first `keep_tokens` (the trigger word stays put)."""
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tokens = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = tokens[:keep_tokens], tokens[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)


def epoch_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int) -> list[list[Item]]:
    """The batches of one epoch: each bucket shuffled and cut into batches, then the batches shuffled.

    Seeded by (seed, epoch) so a run, a resumed run and every process of a multi-GPU run agree.
    """
    rng = random.Random(seed * 100_003 + epoch)
    by_bucket: dict[tuple[int, int], list[Item]] = {}
    for item, times in dataset.epoch_items() + dataset.epoch_items(reg=True):
        by_bucket.setdefault(item.bucket, []).extend([item] * times)
    batches = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        rng.shuffle(members)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches
