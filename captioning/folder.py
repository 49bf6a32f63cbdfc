"""`caption_folder`: sidecar captions for every picture of a training folder, never overwriting the user's."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image
from tqdm import tqdm

from lorasmith.captioning.text import DEFAULT_SEPARATOR, compose
from lorasmith.prep.files import write_text_atomic
from lorasmith.prep.layout import iter_images, repeat_folders
from lorasmith.prep.loading import PictureError, open_picture


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


@dataclass
class Summary:
    captioned: int = 0
    kept: int = 0
    prefixed: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    planned: list[tuple[Path, str]] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.captioned} captioned, {self.kept} kept, {self.prefixed} prefixed, "
                f"{len(self.failed)} failed")


def find_images(folder: Path) -> list[Path]:
    """Pictures of one repeat folder, or of every repeat folder of a training root, or of a plain folder."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: give a repeat folder (10_clay) or the training root")
    subfolders = [f.path for f in repeat_folders(folder) if f.path != folder]
    return [*iter_images(folder), *(image for sub in subfolders for image in iter_images(sub))]


def plan(images: list[Path], options: CaptionOptions) -> list[Job]:
    jobs = []
    for image in images:
        caption = image.with_suffix(options.extension)
        text = caption.read_text(encoding="utf-8", errors="replace").strip() if caption.is_file() else ""
        jobs.append(Job(image, caption, text or None))
    return jobs


def add_prefixes(jobs: list[Job], options: CaptionOptions, dry_run: bool = False) -> Summary:
    """`--prefix-only`: put the prefix/postfix on every caption (a bare prefix where there is none), no model."""
    summary = Summary()
    for job in jobs:
        text = compose(job.existing or "", options.prefix, options.postfix, options.separator)
        if text == (job.existing or ""):
            summary.kept += 1
            continue
        _write(job.caption, text, dry_run, summary)
        summary.prefixed += 1
    return summary


def _write(path: Path, text: str, dry_run: bool, summary: Summary) -> None:
    if dry_run:
        summary.planned.append((path, text))
    else:
        write_text_atomic(path, text + "\n")


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
    todo = [j for j in jobs if options.overwrite or j.existing is None]
    summary.kept = len(jobs) - len(todo)
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
                _write(job.caption, compose(body, options.prefix, options.postfix, options.separator), dry_run, summary)
                summary.captioned += 1
        bar.update(max(1, len(batch_jobs)))
    bar.close()
    return summary
