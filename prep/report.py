"""`prep_report.json`: what happened to every input, and the memory that lets a re-run skip finished work."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lorasmith.prep.files import write_text_atomic
from lorasmith.prep.layout import REPORT_NAME
from lorasmith.prep.picture import Outcome

REPORT_VERSION = 1


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

    def to_json(self) -> str:
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
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def save_report(dst: Path, report: Report) -> Path:
    path = dst / REPORT_NAME
    write_text_atomic(path, report.to_json())
    return path


def load_report(dst: Path) -> Report | None:
    """The previous run's report, or None when there is none or it cannot be trusted (then all is redone)."""
    path = dst / REPORT_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != REPORT_VERSION:
            return None
        known = {f.name for f in fields(Outcome)}
        entries = [Outcome(**{k: v for k, v in e.items() if k in known}) for e in data["entries"]]
        return Report(data["src"], data["folder"], data["name"], data["repeats"], data["options"], entries)
    except (OSError, ValueError, KeyError, TypeError):
        return None
