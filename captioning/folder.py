"""`caption_folder`: sidecar captions for every picture of a training folder, never overwriting the user's.

Sidecars follow prep's one rule (`lorasmith.common.sidecar`): written only for pictures that open, never where
a picture is, read as UTF-8/UTF-16 text, written as UTF-8 with the caption's own permissions, read-only
ones left alone. A problem with one picture or caption is reported by name and the run goes on; a full
disk stops it (StorageError), every caption written so far whole.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image
from tqdm import tqdm

from lorasmith.common.captions import DEFAULT_SEPARATOR, compose
from lorasmith.common.files import StorageError, is_disk_full, storage_message
from lorasmith.common.layout import iter_images, repeat_folders
from lorasmith.common.loading import PictureError, open_picture, picture_problem
from lorasmith.common.sidecar import ReadOnly, SidecarError, load_caption, write_caption


class Captioner(Protocol):
    name: str

    def caption(self, images: list[Image.Image]) -> list[str]: ...


@dataclass(frozen=True)
class CaptionOptions:
    prefix: str = ""
    postfix: str = ""
    separator: str = DEFAULT_SEPARATOR
    extension: str = ".txt"
    overwrite: bool = False
    batch_size: int = 8


@dataclass
class Job:
    image: Path
    caption: Path
    existing: str | None  # the caption already there, if it holds any text
    problem: str | None = None
    """Why this picture's caption must not be touched (unreadable caption, shared sidecar, unwritable folder)."""
    plain: bool = True
    """The caption is UTF-8 without a byte-order mark; --prefix-only rewrites any other so Kohya reads it."""


@dataclass
class Summary:
    captioned: int = 0
    kept: int = 0
    prefixed: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    planned: list[tuple[Path, str]] = field(default_factory=list)
    protected: list[Path] = field(default_factory=list)
    """Read-only captions that were left as they are."""

    def line(self) -> str:
        protected = f", {len(self.protected)} read-only left alone" if self.protected else ""
        return (f"{self.captioned} captioned, {self.kept} kept, {self.prefixed} prefixed{protected}, "
                f"{len(self.failed)} failed")


def find_images(folder: Path, unreadable: list[tuple[Path, str]] | None = None) -> list[Path]:
    """Pictures of one repeat folder, or of every repeat folder of a training root, or of a plain folder.

    A sub-folder that cannot be listed goes to `unreadable` (path, reason) when given; else it raises.
    """
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: give a repeat folder (10_clay) or the training root")
    images = list(iter_images(folder))
    for sub in (f.path for f in repeat_folders(folder) if f.path != folder):
        try:
            images += iter_images(sub)
        except OSError as exc:
            if unreadable is None:
                raise
            unreadable.append((sub, f"cannot list this folder: {exc.strerror or exc}"))
    return images


def plan(images: list[Path], options: CaptionOptions) -> list[Job]:
    """A job per picture with the caption already there; problems found now are kept on the job."""
    jobs = []
    for image in images:
        caption = image.with_suffix(options.extension)
        try:
            text, plain = load_caption(caption) or ("", True)
            jobs.append(Job(image, caption, text or None, plain=plain))
        except SidecarError as exc:
            jobs.append(Job(image, caption, None, f"its caption {caption.name} {exc}"))
    by_caption: dict[Path, list[Job]] = {}
    for job in jobs:
        by_caption.setdefault(job.caption, []).append(job)
    for sharing in (group for group in by_caption.values() if len(group) > 1):
        names = " and ".join(j.image.name for j in sharing)
        for job in sharing:
            job.problem = (f"{names} would share the caption {job.caption.name}: rename one of them so each "
                           "picture has its own")
    return jobs


def _write(job: Job, text: str, dry_run: bool, summary: Summary) -> bool:
    """Write one caption; False (and the reason recorded) when it could not be."""
    if dry_run:
        summary.planned.append((job.caption, text))
        return True
    try:
        write_caption(job.caption, text)
    except ReadOnly:
        summary.protected.append(job.caption)
        return False
    except SidecarError as exc:
        summary.failed.append((job.caption, str(exc)))
        return False
    except OSError as exc:
        if is_disk_full(exc):
            raise StorageError(storage_message(exc, job.caption)) from None
        summary.failed.append((job.caption, f"cannot be written: {exc.strerror or exc}"))
        return False
    return True


def add_prefixes(jobs: list[Job], options: CaptionOptions, dry_run: bool = False) -> Summary:
    """`--prefix-only`: put the prefix/postfix on every caption (a bare prefix where there is none), no model.

    A sidecar is written only for a picture that opens, so a text file named `.png` gets none.
    """
    summary = Summary()
    for job in jobs:
        if job.problem:
            summary.failed.append((job.image, job.problem))
            continue
        text = compose(job.existing or "", options.prefix, options.postfix, options.separator)
        if text == (job.existing or "") and job.plain:
            summary.kept += 1
            continue
        problem = picture_problem(job.image)
        if problem:
            summary.failed.append((job.image, f"{problem}; no caption written"))
            continue
        summary.prefixed += _write(job, text, dry_run, summary)
    return summary


def _batches(jobs: list[Job], size: int, load: Callable[[Path], Image.Image], summary: Summary
             ) -> Iterator[tuple[list[Job], list[Image.Image]]]:
    """Decoded pictures in batches of `size`; an unreadable one is reported and left out, the rest go on."""
    batch: list[tuple[Job, Image.Image]] = []
    for job in jobs:
        try:
            batch.append((job, load(job.image)))
        except PictureError as exc:
            summary.failed.append((job.image, str(exc)))
            yield [], []  # still advance the progress bar
        if len(batch) == size:
            yield [j for j, _ in batch], [i for _, i in batch]
            batch = []
    if batch:
        yield [j for j, _ in batch], [i for _, i in batch]


def caption_folder(
    jobs: list[Job],
    captioner: Captioner | None,
    options: CaptionOptions,
    input_size: int = 384,
    dry_run: bool = False,
    progress: bool = True,
) -> Summary:
    """Caption the jobs that need it in batches; existing captions are kept unless `options.overwrite`."""
    summary = Summary()
    todo = []
    for job in jobs:
        if job.problem:
            summary.failed.append((job.image, job.problem))
        elif options.overwrite or job.existing is None:
            todo.append(job)
        else:
            summary.kept += 1
    if not todo:
        return summary

    def load(path: Path) -> Image.Image:
        # Twice the model's input is all a captioner sees; big JPEGs decode at reduced scale.
        return open_picture(path, draft_for=lambda w, h: (min(w, 2 * input_size), min(h, 2 * input_size))).image

    bar = tqdm(total=len(todo), desc=f"caption-folder ({captioner.name})", unit="img", disable=not progress,
               file=sys.stderr)
    for batch_jobs, images in _batches(todo, max(1, options.batch_size), load, summary):
        if batch_jobs:
            for job, body in zip(batch_jobs, captioner.caption(images)):
                text = compose(body, options.prefix, options.postfix, options.separator)
                summary.captioned += _write(job, text, dry_run, summary)
        bar.update(max(1, len(batch_jobs)))
    bar.close()
    return summary
