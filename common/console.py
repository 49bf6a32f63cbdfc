"""What every command line shares: help that shows defaults, typed option checks, stdout that never crashes on a
name, and one way for a file-by-file job to end early (usage error 2, disk 1, signal 128 + n)."""

from __future__ import annotations

import argparse
import sys


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = action.nargs == 0
        if action.default not in (None, argparse.SUPPRESS) and not flag and action.option_strings and "default" not in text:
            text += " (default: %(default)s)"
        return text


def at_least(low: int):
    """An argparse type: a whole number of at least `low` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def printable_output() -> None:
    """Names that are not UTF-8 print as escapes instead of ending the run with an encoding error."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def guarded(prog: str, kept: str, usage_errors: tuple, work):
    """(exit code, None) after one stderr line for the ways a file-by-file job ends early, or (None, what
    `work()` returned): usage errors 2, a full or unwritable disk 1, Ctrl-C/SIGTERM 128 + the signal."""
    from lorasmith.common.files import StorageError
    from lorasmith.common.lock import Busy
    from lorasmith.common.stop import Stopped, stop_on_signals

    stop_on_signals()
    try:
        return None, work()
    except (*usage_errors, Busy, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2, None
    except StorageError as exc:
        print(f"{prog}: error: {exc}; {kept}: make room and run it again", file=sys.stderr)
        return 1, None
    except Stopped as stop:
        print(f"{prog}: stopped by {stop.name}; {kept}: run it again to do the rest", file=sys.stderr)
        return stop.exit_code, None
