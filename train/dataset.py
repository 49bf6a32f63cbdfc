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

from lorasmith.common.crop import render
from lorasmith.common.files import sha256_file
from lorasmith.common.layout import iter_images, repeat_folders, stray_pictures
from lorasmith.common.loading import PictureError, open_picture, picture_size
from lorasmith.common.sidecar import SidecarError, decode_text, read_caption
from lorasmith.common.sizing import crop_box
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
    size: tuple[int, int] | None = None
    """The picture's upright size, for the bucket metadata (Kohya's mean aspect-ratio error)."""


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


def _caption(image: Path, extension: str, fallback: str, warnings: list[str]) -> str | None:
    """The picture's caption; the folder's tokens when it has none; None when it cannot be read (then the
    picture is left out: training it under the wrong caption would be worse than not at all)."""
    sidecar = image.with_suffix(extension)
    try:
        text = read_caption(sidecar)
    except SidecarError as exc:
        warnings.append(f"{sidecar}: {exc}; its picture {image.name} is left out")
        return None
    if text:
        return text
    warnings.append(f"{image.name}: no caption ({sidecar.name}); using the folder's tokens {fallback!r}")
    return fallback


def _probe(path: Path, warnings: list[str], where: str) -> tuple[tuple[int, int], str] | None:
    """(upright size, sha256) of a picture that decodes; None, with a warning naming it, for one that does
    not (a text file named .png, a truncated download, an unreadable file)."""
    try:
        return picture_size(path), sha256_file(path)
    except PictureError as exc:
        reason = str(exc)
    except OSError as exc:
        reason = f"cannot be read: {exc.strerror or exc}"
    warnings.append(f"{where}: {reason}; left out")
    return None


def _read_metadata(root: Path, buckets, is_reg: bool, warnings: list[str]) -> list[Item]:
    """A diffusers `metadata.jsonl` folder: one JSON object per line with `file_name` and `text`. A line that
    cannot be used is named and left out; the file must leave at least one picture."""
    metadata = root / "metadata.jsonl"
    try:
        lines = decode_text(metadata.read_bytes()).splitlines()
    except (OSError, SidecarError) as exc:
        raise DatasetError(f"{metadata} {getattr(exc, 'strerror', None) or exc}") from None
    items: list[Item] = []
    for n, line in enumerate(lines, 1):
        where = f"{metadata.name}:{n}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row.get("text")
            if not isinstance(name, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            warnings.append(f"{where}: not a JSON object with a file_name; line left out")
            continue
        if not isinstance(text, str):
            warnings.append(f"{where}: {name} has no text ({json.dumps(text)}); trained with an empty caption")
            text = ""
        path = root / name
        if not path.is_file():
            warnings.append(f"{where}: {name} does not exist; left out")
            continue
        probed = _probe(path, warnings, f"{where}: {name}")
        if probed:
            items.append(Item(path, text.strip(), 1, assign_bucket(probed[0], buckets), is_reg, probed[1], probed[0]))
    if not items:
        raise DatasetError(f"{metadata} lists no picture that can be used ({_first(warnings)}): check the "
                           "file_name of each line against the pictures in that folder")
    return items


def _first(warnings: list[str], count: int = 3) -> str:
    more = f"; and {len(warnings) - count} more" if len(warnings) > count else ""
    return "; ".join(warnings[:count]) + more


def read_folder(root: Path, extension: str, buckets: list[tuple[int, int]], is_reg: bool = False,
                exclude: tuple[Path, ...] = ()) -> tuple[list[Item], list[str], dict[str, int]]:
    """The pictures of a training root (repeat folders, or a metadata.jsonl folder) with their captions.

    Folders in `exclude` (the run's own outputs) are never read. Pictures that cannot be used, folders
    that are not repeat folders, and captions that cannot be read are named in the warnings.
    """
    warnings: list[str] = []
    if (root / "metadata.jsonl").is_file():
        return _read_metadata(root, buckets, is_reg, warnings), warnings, {root.name: 1}
    skip = {p.resolve() for p in exclude}
    found = [f for f in repeat_folders(root) if f.path.resolve() not in skip]
    warnings += stray_pictures(root, exclude)
    loose = [p.name for p in iter_images(root)] if root not in [f.path for f in found] else []
    if loose:
        warnings.append(f"{root}: {len(loose)} picture(s) lie directly in the training root and are not used "
                        f"(e.g. {loose[0]}): put them in a <repeats>_<name> folder such as 10_clay")
    if not found:
        raise DatasetError(f"{root} holds no <repeats>_<name> folders (like 100_clay) and no metadata.jsonl: "
                           "point it at the --out folder of prep-images")
    items: list[Item] = []
    folders: dict[str, int] = {}
    for folder in found:
        folders[folder.path.name] = folder.repeats
        try:
            pictures = list(iter_images(folder.path))
        except OSError as exc:
            warnings.append(f"{folder.path}: cannot list this folder ({exc.strerror or exc}); left out")
            continue
        for image in pictures:
            probed = _probe(image, warnings, str(image))
            caption = _caption(image, extension, folder.tokens, warnings) if probed else None
            if caption is not None:
                items.append(Item(image, caption, folder.repeats, assign_bucket(probed[0], buckets), is_reg,
                                  probed[1], probed[0]))
    if not items:
        raise DatasetError(f"{root}: the repeat folders hold no picture that can be used ({_first(warnings)})")
    return items, warnings, folders


def load_dataset(train_dir: Path, reg_dir: Path | None, extension: str, buckets: list[tuple[int, int]],
                 exclude: tuple[Path, ...] = ()) -> Dataset:
    """The training set (and regularisation set), leaving out the `exclude` folders (the run's outputs)."""
    items, warnings, folders = read_folder(train_dir, extension, buckets, exclude=exclude)
    reg_items: list[Item] = []
    if reg_dir is not None:
        reg_items, reg_warnings, _ = read_folder(reg_dir, extension, buckets, is_reg=True, exclude=exclude)
        warnings += reg_warnings
    return Dataset(items, reg_items, warnings, folders)


def load_pixels(item: Item, flip: bool = False) -> Image.Image:
    """The item's picture at its bucket size: resized to cover and centre-cropped (a no-op for prep's outputs)."""
    try:
        image = open_picture(item.image).image
    except PictureError as exc:
        raise DatasetError(f"{item.image}: {exc}; it changed since the dataset was read: run again") from None
    if image.size != item.bucket:
        image = render(image, crop_box(image.width, image.height, item.bucket), item.bucket)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def crop_geometry(size: tuple[int, int], bucket: tuple[int, int], flip: bool = False) -> tuple[int, ...]:
    """Where a (w, h) picture's pixels come from, as SDXL's size/crop conditioning states it: `load_pixels`
    resizes the picture to cover its (w, h) bucket and crops the centre, so this is (picture h, w, the crop's top
    and left in the resized picture, measured from the left of the mirrored picture when flipped, bucket h, w)."""
    (w, h), (bw, bh) = size, bucket
    box = crop_box(w, h, bucket)
    scale = bw / (box.right - box.left)
    left, top = round(box.left * scale), round(box.top * scale)
    if flip:
        left = round(w * scale) - left - bw
    return h, w, top, left, bh, bw


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
