"""`caption-folder`: the command-line face of stage 1b. Exit codes: 0 done, 1 some picture failed, 2 usage/model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorasmith.common.captions import DEFAULT_SEPARATOR, has_prefix
from lorasmith.common.console import HelpFormatter, at_least, guarded, printable_output

MAX_SEED = 2**32 - 1


def _number(kind, low, high, low_open=False):
    """An argparse type for a number in [low, high] ((low, high] with `low_open`); argparse names the option."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must lie in {'(' if low_open else '['}{low}, {high}], got {text}")
        return value

    return parse


def extension_arg(text: str) -> str:
    from lorasmith.common.sidecar import caption_extension

    try:
        return caption_extension(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("--caption-extension ", "")) from None


def caption_words(text: str) -> str:
    """Words that go into every caption, on one line: Kohya reads only a caption's first line."""
    from lorasmith.common.sidecar import control_character

    found = control_character(text)
    if found in ("U+000A", "U+000D"):
        raise argparse.ArgumentTypeError(f"holds a line break ({found}), and Kohya reads only a caption's first "
                                         "line: give the words on one line")
    if found:
        raise argparse.ArgumentTypeError(f"holds a control character ({found}), and a caption is one line of "
                                         "plain text: give the words without it")
    return text


EPILOG = """\
Captions are written as `prefix, caption, postfix`: Kohya's keep_tokens and caption shuffling count
comma-separated tokens, so the trigger phrase must be the first token. A prefix the caption already
holds is never doubled. Captions already beside a picture (the user's work) are kept unless --overwrite;
an empty caption file counts as missing.

Sampling: Kohya's default is nucleus sampling (top-p 0.9, seed 42), which gives livelier captions but
depends on the batch a picture lands in; --beam-search is deterministic (same caption at any batch size).

Safety: a caption is written only for a picture that opens, never with a picture's extension; captions
are read as UTF-8 (a byte-order mark is dropped, UTF-16 from Windows Notepad is recognised) and written
as UTF-8 keeping their permissions; a read-only caption is left as it is. One run at a time per folder.

exit codes: 0 done, 1 some picture or caption could not be read or written (the rest were captioned)
or the disk filled up, 2 usage error, model not available or folder in use (nothing written), 130/143
stopped by Ctrl-C/SIGTERM (every caption written so far is whole).
"""


def build_parser() -> argparse.ArgumentParser:
    from lorasmith.models.blip import DEFAULT_BLIP
    from lorasmith.models.wd14 import DEFAULT_WD14

    p = argparse.ArgumentParser(
        prog="caption-folder",
        description="Write a sidecar caption (<stem>.txt) beside every picture of a training folder: one repeat "
        "folder (10_clay), or a training root holding several.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("dir", metavar="DIR", type=Path, help="repeat folder or training root")
    p.add_argument("--prefix", type=caption_words, default="",
                   help="trigger phrase put first in every caption, e.g. 'claymation style'")
    p.add_argument("--postfix", type=caption_words, default="",
                   help="words put last in every caption, e.g. 'high quality'")
    p.add_argument("--separator", type=caption_words, default=DEFAULT_SEPARATOR,
                   help="joins prefix, caption and postfix")
    p.add_argument("--caption-extension", type=extension_arg, default=".txt",
                   help="sidecar extension; Kohya's captioner writes .caption, which its trainer ignores unless told")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions instead of keeping them")
    p.add_argument("--prefix-only", action="store_true",
                   help="run no model: add or normalise prefix/postfix on existing captions (a bare prefix where none)")
    p.add_argument("--captioner", choices=("blip", "wd14", "blip+wd14"), default="blip",
                   help="BLIP sentences (photos, objects, styles), WD14 booru tags (anime), or the sentence then the tags")
    p.add_argument("--model", default=DEFAULT_BLIP, help="BLIP hub id or local folder")
    p.add_argument("--beam-search", action="store_true", help="beam search instead of nucleus sampling")
    p.add_argument("--num-beams", type=at_least(1), default=1,
                   help="beams with --beam-search (3-5 gives fuller sentences)")
    p.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=0.9,
                   help="nucleus sampling cut-off, in (0, 1]")
    p.add_argument("--min-length", type=at_least(0), default=5, help="shortest caption in tokens")
    p.add_argument("--max-length", type=at_least(1), default=75, help="longest caption in tokens")
    p.add_argument("--batch-size", type=at_least(1), default=8,
                   help="pictures per model call; lower it if memory runs out")
    p.add_argument("--seed", type=_number(int, 0, MAX_SEED), default=42, help="random seed for sampling")
    p.add_argument("--wd14-model", default=DEFAULT_WD14, help="WD14 hub id or folder with model.onnx + selected_tags.csv")
    p.add_argument("--general-threshold", type=_number(float, 0, 1), default=0.35,
                   help="WD14 confidence for general tags, in [0, 1]")
    p.add_argument("--character-threshold", type=_number(float, 0, 1), default=0.85,
                   help="WD14 confidence for character tags (Kohya uses 0.35 for both)")
    p.add_argument("--undesired-tags", default="", help="comma-separated WD14 tags never written")
    p.add_argument("--keep-underscores", action="store_true", help="keep WD14's long_hair instead of long hair")
    p.add_argument("--rating-tags", action="store_true", help="add WD14's rating tag (general, sensitive, ...)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA in fp16 when present")
    p.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _captioner(args):
    from lorasmith.models.blip import BlipCaptioner, BlipSettings
    from lorasmith.models.wd14 import Wd14Settings, Wd14Tagger

    blip = wd14 = None
    if "blip" in args.captioner:
        blip = BlipCaptioner(BlipSettings(args.model, args.beam_search, args.num_beams, args.top_p,
                                          args.min_length, args.max_length), args.device)
    if "wd14" in args.captioner:
        undesired = tuple(t.strip() for t in args.undesired_tags.split(",") if t.strip())
        wd14 = Wd14Tagger(Wd14Settings(args.wd14_model, args.general_threshold, args.character_threshold,
                                       undesired, not args.keep_underscores, args.rating_tags), args.device)
    if blip and wd14:
        return Combined(blip, wd14), blip.input_size
    return (blip, blip.input_size) if blip else (wd14, wd14.input_size)


class Combined:
    """The BLIP sentence, then the WD14 tags: a readable caption with the details tags catch."""

    name = "blip+wd14"

    def __init__(self, blip, wd14):
        self.blip, self.wd14 = blip, wd14

    def caption(self, images):
        return [", ".join(p for p in (b, t) if p) for b, t in zip(self.blip.caption(images), self.wd14.caption(images))]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.min_length > args.max_length:
        parser.error(f"argument --min-length: {args.min_length} is more than --max-length {args.max_length}")
    printable_output()
    from lorasmith.captioning.folder import CaptionOptions
    from lorasmith.common.hub import ModelNotFound

    options = CaptionOptions(args.prefix, args.postfix, args.separator, args.caption_extension, args.overwrite,
                             args.batch_size)
    locks = []
    try:
        code, done = guarded("caption-folder", "every caption written so far is whole", (ModelNotFound,),
                             lambda: _run(args, options, locks))
    finally:
        for lock in locks:
            lock.release()
    if code is not None:
        return code
    summary, jobs = done
    for path, text in summary.planned:
        print(f"would write {path}: {text}")
    for path, reason in summary.failed:
        print(f"error: {path}: {reason}", file=sys.stderr)
    for path in summary.protected:
        print(f"note: {path}: read-only, left as it is (make it writable to let caption-folder change it)",
              file=sys.stderr)
    unprefixed = [j for j in jobs if j.existing and args.prefix.strip() and not has_prefix(j.existing, args.prefix)]
    if unprefixed and not args.prefix_only and not args.overwrite:
        print(f"note: {len(unprefixed)} kept caption(s) do not start with {args.prefix!r} (e.g. {unprefixed[0].caption.name}); "
              "add it with --prefix-only", file=sys.stderr)
    print(f"caption-folder: {summary.line()} in {args.dir}" + (" (dry run: nothing written)" if args.dry_run else ""))
    return 1 if summary.failed else 0


def _run(args, options, locks: list):
    """Find the pictures, lock the folders that will be written, then prefix or caption."""
    from lorasmith.captioning.folder import add_prefixes, caption_folder, find_images, plan
    from lorasmith.common.layout import parse_repeat_folder, stray_pictures

    unreadable: list[tuple[Path, str]] = []
    images = find_images(args.dir, unreadable)
    if parse_repeat_folder(args.dir) is None:
        for warning in stray_pictures(args.dir):
            print(f"warning: {warning}", file=sys.stderr)
    if not images and not unreadable:
        raise ValueError(f"{args.dir} holds no pictures (nor do repeat folders inside it)")
    jobs = plan(images, options)
    if not args.dry_run:
        unwritable = _lock_folders({args.dir, *(j.image.parent for j in jobs)}, locks)
        for job in jobs:
            if job.image.parent in unwritable and not job.problem:
                job.problem = unwritable[job.image.parent]
    if args.prefix_only:
        summary = add_prefixes(jobs, options, args.dry_run)
    elif all(j.existing or j.problem for j in jobs) and not args.overwrite:
        summary = caption_folder(jobs, None, options, dry_run=args.dry_run, progress=False)
    else:
        import torch

        torch.manual_seed(args.seed)
        captioner, size = _captioner(args)
        summary = caption_folder(jobs, captioner, options, size, args.dry_run, not args.quiet)
    summary.failed[:0] = unreadable
    return summary, jobs


def _lock_folders(folders: set[Path], locks: list) -> dict[Path, str]:
    """Lock every folder captions go into (one run at a time, and stale temporary files of killed runs
    cleared); returns {folder: reason} for those that cannot be written. Busy when another run holds one."""
    from lorasmith.common.files import StorageError, clear_stale_parts, is_disk_full, storage_message
    from lorasmith.common.lock import RunLock

    unwritable = {}
    for folder in sorted(folders):
        lock = RunLock(folder, "caption-folder")
        try:
            lock.acquire()  # Busy (another run holds it) ends the run
        except OSError as exc:
            if is_disk_full(exc):
                raise StorageError(storage_message(exc, lock.path)) from None
            unwritable[folder] = f"the folder {folder.name} cannot be written ({exc.strerror}); no caption written"
            continue
        locks.append(lock)
        clear_stale_parts(folder)
    return unwritable


if __name__ == "__main__":
    sys.exit(main())
