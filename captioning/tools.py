"""`captions`: the caption chores GUI users expect, on a whole folder: a token frequency table, find/replace."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorasmith.captioning.cli import caption_words, extension_arg
from lorasmith.common.captions import check_pattern, frequency, replace
from lorasmith.common.console import HelpFormatter, at_least
from lorasmith.common.sidecar import SidecarError, control_character, read_caption, write_caption


def _captions(folder: Path, extension: str, problems: list[str]) -> dict[Path, str]:
    """Caption path → text for every picture that has one; captions that cannot be read go to `problems`."""
    from lorasmith.captioning.folder import find_images

    found = {}
    for image in find_images(folder):
        path = image.with_suffix(extension)
        try:
            text = read_caption(path)
        except SidecarError as exc:
            problems.append(f"{path} {exc}")
            continue
        if text is not None:
            found[path] = text
    return found


def stats(folder: Path, extension: str, top: int, problems: list[str]) -> list[str]:
    """Each token with the number and share of captions holding it, most frequent first."""
    captions = _captions(folder, extension, problems)
    counts = frequency(captions.values())
    lines = [f"{len(captions)} captions, {len(counts)} distinct tokens"]
    for token, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]:
        lines.append(f"{n:6d}  {100 * n / max(1, len(captions)):5.1f}%  {token}")
    return lines


def replace_all(folder: Path, extension: str, old: str, new: str, regex: bool, token: bool, dry_run: bool,
                problems: list[str]) -> list[str]:
    lines = []
    for path, before in _captions(folder, extension, problems).items():
        after = replace(before, old, new, regex=regex, whole_token=token)
        if after == before:
            continue
        found = control_character(after)
        if found:  # from a regex replacement such as \n
            problems.append(f"{path}: the replacement would put the control character {found} into it (Kohya "
                            "reads only a caption's first line); left as it is")
            continue
        try:
            if not dry_run:
                write_caption(path, after)
            lines.append(f"{path}: {before!r} -> {after!r}")
        except SidecarError as exc:
            problems.append(f"{path} {exc}")
    lines.append(f"{len(lines)} caption(s) {'would change' if dry_run else 'changed'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="captions", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--caption-extension", type=extension_arg, default=".txt", help="sidecar extension to read")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stats", help="token frequency table", formatter_class=HelpFormatter)
    s.add_argument("dir", metavar="DIR", type=Path, help="repeat folder or training root")
    s.add_argument("--top", type=at_least(1), default=50, help="rows to show")
    r = sub.add_parser("replace", help="find/replace across captions", formatter_class=HelpFormatter)
    r.add_argument("dir", metavar="DIR", type=Path, help="repeat folder or training root")
    r.add_argument("old", help="text (or regular expression with --regex) to find")
    r.add_argument("new", metavar="NEW", type=caption_words,
                   help="replacement; with --token and an empty NEW the token is removed")
    r.add_argument("--regex", action="store_true", help="OLD is a Python regular expression")
    r.add_argument("--token", action="store_true", help="match whole comma-separated tokens only")
    r.add_argument("--dry-run", action="store_true", help="show the changes, write nothing")
    args = parser.parse_args(argv)
    problems: list[str] = []
    try:
        if args.command == "replace" and args.regex:
            check_pattern(args.old, args.new)
        if args.command == "stats":
            lines = stats(args.dir, args.caption_extension, args.top, problems)
        else:
            lines = replace_all(args.dir, args.caption_extension, args.old, args.new, args.regex, args.token,
                                args.dry_run, problems)
    except (ValueError, OSError) as exc:
        print(f"captions: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
