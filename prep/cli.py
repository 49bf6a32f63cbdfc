"""`prep-images`: the command-line face of stage 1a. Exit codes: 0 done, 1 some input failed, 2 usage error."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from PIL import ImageColor

from lorasmith.common.console import HelpFormatter, at_least, guarded, printable_output
from lorasmith.common.crop import CROP_HELP, CROP_MODES
from lorasmith.common.layout import check_folder_name, validate_name
from lorasmith.common.loading import DEFAULT_MAX_PIXELS
from lorasmith.prep.picture import PrepOptions

EPILOG = """\
repeats:
  Kohya trains each picture <repeats> times per epoch, read from the folder name (150_clay).
  'auto' follows the most common guidance: at least 100 repeats per picture and at least 1,500 views
  in total, i.e. max(100, ceil(1500 / pictures)) (10 pictures -> 150, 20 -> 100). Guides disagree:
  another widely copied table starts much lower, anime/illustration 7-15, portraits 20-30,
  objects 30-100, and relies on more epochs instead. Set --repeats N to follow it.

One run at a time per DST: a second one is refused with the first one's pid. A run that is stopped
(Ctrl-C, SIGTERM, kill -9, a full disk) keeps every picture it finished; run the same command again and
only the rest is done. Files that are not pictures (named pipes, sockets, devices) are skipped by type.

exit codes: 0 every picture written or deliberately skipped, 1 some picture failed (or was skipped
under --strict) or the disk filled up, 2 usage error (bad SRC/DST/NAME or option, SRC without pictures,
DST not writable or in use), 130/143 stopped by Ctrl-C/SIGTERM. prep_report.json in --out lists every
input with its reason.
"""


def _repeats(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("repeats must be at least 1")
    return value


def _colour(text: str) -> tuple[int, int, int]:
    try:
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown colour {text!r}: use a name (white) or #rrggbb") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prep-images",
        description="Turn a folder of pictures into a Kohya training folder DST/<repeats>_<NAME>/ of clean RGB "
        "PNGs whose sides are multiples of 64. Originals are only read, never changed.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", type=Path, help="folder of pictures (searched recursively)")
    parser.add_argument("--out", "-o", dest="dst", metavar="DST", type=Path, required=True,
                        help="training root to write into; may lie inside SRC (it is never read back as input)")
    parser.add_argument("--name", required=True,
                        help="concept or trigger tokens for the folder name, e.g. 'claymation style'")
    parser.add_argument("--repeats", type=_repeats, default=None, metavar="auto|N",
                        help="repeats per picture per epoch, see below (default: auto)")
    parser.add_argument("--min-side", type=at_least(64), default=512,
                        help="smallest output side (multiple of 64 at or above)")
    parser.add_argument("--max-side", type=at_least(64), default=None,
                        help="largest output side (default: 768), or 2048 with --area. SD1.x: 512 for 8 GB GPUs, "
                             "768 where VRAM allows; SD2.x 768-v: --min-side 768 --max-side 1024")
    parser.add_argument("--area", type=at_least(64), default=None, metavar="N",
                        help="size by area instead, for SDXL (--area 1024): for each side the largest other side "
                             "keeping the product within N² (Kohya's SDXL buckets), closest aspect ratio, sides "
                             "between --min-side and --max-side")
    parser.add_argument("--crop", choices=CROP_MODES, default="center", help=CROP_HELP)
    parser.add_argument("--background", type=_colour, default="white",
                        help="colour laid under transparent pixels (name or #rrggbb)")
    parser.add_argument("--no-upscale", dest="upscale", action="store_false",
                        help="skip pictures whose shorter side is below --min-side instead of upscaling them")
    parser.add_argument("--max-pixels", type=at_least(1), default=DEFAULT_MAX_PIXELS,
                        help="refuse pictures with more pixels than this (decompression-bomb guard)")
    parser.add_argument("--workers", type=at_least(1), default=os.cpu_count() or 1,
                        help="parallel processes (default: all cores, here %(default)s)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (sizes, repeats) and write nothing")
    parser.add_argument("--strict", action="store_true", help="count skipped pictures as failures (exit 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    printable_output()
    from lorasmith.prep.pipeline import UsageError, prepare_folder, validate_paths

    def work():
        from lorasmith.common.sizing import auto_repeats, candidate_sizes

        name = validate_name(args.name)
        check_folder_name(name, args.repeats or auto_repeats(1))  # auto repeats are largest for one picture
        max_side = args.max_side or (2048 if args.area else 768)
        options = PrepOptions(args.min_side, max_side, args.crop, tuple(args.background), args.upscale,
                              args.max_pixels, args.area)
        candidate_sizes(options.min_side, options.max_side, area=options.area)
        validate_paths(args.src, args.dst)
        if args.dry_run:
            from lorasmith.prep.plan import plan_lines

            print("\n".join(plan_lines(args.src, args.dst, name, options, args.repeats)))
            return None
        return prepare_folder(args.src, args.dst, name, options, args.repeats, args.workers,
                              progress=not args.quiet)

    code, result = guarded("prep-images", "the pictures finished so far are kept", (UsageError,), work)
    if code is not None:
        return code
    return 0 if result is None else _summarise(result, args.strict)


def _summarise(result, strict: bool) -> int:
    report = result.report
    for entry in report.entries:
        for warning in entry.warnings if entry.source in result.fresh else ():
            print(f"warning: {entry.source}: {warning}", file=sys.stderr)
        if entry.status == "failed":
            print(f"error: {entry.source}: {entry.reason}", file=sys.stderr)
        elif entry.status == "skipped":
            print(f"skipped: {entry.source}: {entry.reason}", file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for message in result.messages:
        print(f"note: {message}", file=sys.stderr)
    counts = report.counts()
    where = f"{result.folder} ({report.repeats} repeats)" if result.folder else "no repeat folder (no picture written)"
    print(
        f"prep-images: {counts['written']} written ({counts['written'] - result.reused} new, {result.reused} up to "
        f"date), {counts['skipped']} skipped, {counts['failed']} failed → {where}; report: {result.report_path}"
    )
    failed = counts["failed"] + (counts["skipped"] if strict else 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
