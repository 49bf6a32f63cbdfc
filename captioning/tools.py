"""`captions`: the caption chores GUI users expect, on a whole folder: a token frequency table, find/replace."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorasmith.captioning.text import frequency, replace
from lorasmith.prep.cli import HelpFormatter
from lorasmith.prep.files import write_text_atomic


def _captions(folder: Path, extension: str) -> list[Path]:
    from lorasmith.captioning.folder import find_images

    return [c for image in find_images(folder) if (c := image.with_suffix(extension)).is_file()]


def stats(folder: Path, extension: str, top: int) -> list[str]:
    """Each token with the number and share of captions holding it, most frequent first."""
    paths = _captions(folder, extension)
    counts = frequency(p.read_text(encoding="utf-8") for p in paths)
    lines = [f"{len(paths)} captions, {len(counts)} distinct tokens"]
    for token, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]:
        lines.append(f"{n:6d}  {100 * n / max(1, len(paths)):5.1f}%  {token}")
    return lines


def replace_all(folder: Path, extension: str, old: str, new: str, regex: bool, token: bool, dry_run: bool) -> list[str]:
    lines = []
    for path in _captions(folder, extension):
        before = path.read_text(encoding="utf-8").strip()
        after = replace(before, old, new, regex=regex, whole_token=token)
        if after != before:
            lines.append(f"{path}: {before!r} -> {after!r}")
            if not dry_run:
                write_text_atomic(path, after + "\n")
    lines.append(f"{len(lines)} caption(s) {'would change' if dry_run else 'changed'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="captions", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--caption-extension", default=".txt", help="sidecar extension to read")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stats", help="token frequency table", formatter_class=HelpFormatter)
    s.add_argument("dir", metavar="DIR", type=Path, help="repeat folder or training root")
    s.add_argument("--top", type=int, default=50, help="rows to show")
    r = sub.add_parser("replace", help="find/replace across captions", formatter_class=HelpFormatter)
    r.add_argument("dir", metavar="DIR", type=Path, help="repeat folder or training root")
    r.add_argument("old", help="text (or regular expression with --regex) to find")
    r.add_argument("new", help="replacement; with --token and an empty NEW the token is removed")
    r.add_argument("--regex", action="store_true", help="OLD is a Python regular expression")
    r.add_argument("--token", action="store_true", help="match whole comma-separated tokens only")
    r.add_argument("--dry-run", action="store_true", help="show the changes, write nothing")
    args = parser.parse_args(argv)
    try:
        if args.command == "stats":
            lines = stats(args.dir, args.caption_extension, args.top)
        else:
            lines = replace_all(args.dir, args.caption_extension, args.old, args.new, args.regex, args.token,
                                args.dry_run)
    except (ValueError, OSError) as exc:
        print(f"captions: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
