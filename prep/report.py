"""`prep_report.json`: what happened to every input, and the memory that lets a re-run skip finished work.

While a run is under way each finished picture is also appended to a journal (`.prep_journal.jsonl`), so
a run killed with kill -9 loses at most the pictures in flight: the next run reads the journal on top of
the last report. A complete run writes the report and deletes the journal.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lorasmith.common.files import write_bytes_atomic
from lorasmith.common.layout import REPORT_NAME
from lorasmith.prep.picture import Outcome

REPORT_VERSION = 1
JOURNAL_NAME = ".prep_journal.jsonl"


def json_bytes(data, indent: int | None = None) -> bytes:
    """JSON as UTF-8. Names that are not valid UTF-8 (surrogate escapes) become JSON `\\udcXX` escapes, which
    read back as the same name, instead of failing the write."""
    return json.dumps(data, indent=indent, ensure_ascii=False).encode("utf-8", "backslashreplace")


@dataclass
class Report:
    src: str
    folder: str | None
    name: str
    repeats: int | None
    options: dict
    entries: list[Outcome] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = {"written": 0, "skipped": 0, "failed": 0}
        for entry in self.entries:
            counts[entry.status] += 1
        return counts

    def to_json(self) -> bytes:
        data = {
            "version": REPORT_VERSION,
            "src": self.src,
            "folder": self.folder,
            "name": self.name,
            "repeats": self.repeats,
            "options": self.options,
            "summary": self.counts(),
            "entries": [asdict(e) for e in self.entries],
        }
        return json_bytes(data, indent=2) + b"\n"


def save_report(dst: Path, report: Report) -> Path:
    path = dst / REPORT_NAME
    write_bytes_atomic(path, report.to_json())
    return path


def _outcome(data: dict) -> Outcome:
    known = {f.name for f in fields(Outcome)}
    return Outcome(**{k: v for k, v in data.items() if k in known})


def load_report(dst: Path) -> Report | None:
    """The last complete run's report with what a killed run finished since on top, or None when nothing can
    be trusted (then all is redone)."""
    report = _read_report(dst)
    journal = _read_journal(dst)
    if journal is None:
        return report
    header, entries = journal
    if report is None or (report.src, report.options) != (header["src"], header["options"]):
        report = Report(header["src"], None, header["name"], None, header["options"])
    by_source = {e.source: e for e in report.entries}
    by_source.update({e.source: e for e in entries})
    report.entries = list(by_source.values())
    return report


def _read_report(dst: Path) -> Report | None:
    try:
        data = json.loads((dst / REPORT_NAME).read_text(encoding="utf-8"))
        if data.get("version") != REPORT_VERSION:
            return None
        entries = [_outcome(e) for e in data["entries"]]
        return Report(data["src"], data["folder"], data["name"], data["repeats"], data["options"], entries)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _journal_header(path: Path) -> dict | None:
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.readline())
    except (OSError, ValueError):
        return None


def _read_journal(dst: Path) -> tuple[dict, list[Outcome]] | None:
    """The header and entries of a journal; a line cut short by a kill is skipped."""
    try:
        lines = (dst / JOURNAL_NAME).read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        if header.get("version") != REPORT_VERSION:
            return None
        entries = []
        for line in lines[1:]:
            try:
                entries.append(_outcome(json.loads(line)))
            except (ValueError, TypeError):
                continue  # a line cut short by a kill
        return header, entries
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError):
        return None


class Journal:
    """Appends one line per finished picture; flushed at once, so it survives the process being killed.

    A journal left by a killed run with the same setup is continued, so a run killed twice still knows
    everything either run finished."""

    def __init__(self, dst: Path, src: str, name: str, options: dict):
        self.path = dst / JOURNAL_NAME
        header = {"version": REPORT_VERSION, "src": src, "name": name, "options": options}
        if _journal_header(self.path) == header:
            self.handle = open(self.path, "ab+")
            self.handle.seek(-1, os.SEEK_END)
            if self.handle.read(1) != b"\n":  # a line cut short by a kill: start on a fresh one
                self.handle.write(b"\n")
        else:
            self.handle = open(self.path, "wb")
            self._write(header)

    def _write(self, data: dict) -> None:
        self.handle.write(json_bytes(data) + b"\n")
        self.handle.flush()

    def add(self, outcome: Outcome) -> None:
        self._write(asdict(outcome))

    def close(self, delete: bool) -> None:
        """Close (once; later calls do nothing) and, after a complete run, delete the journal."""
        if self.handle.closed:
            return
        try:
            self.handle.close()
        except OSError:
            pass
        if delete:
            self.path.unlink(missing_ok=True)
