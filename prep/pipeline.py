"""`prepare_folder`: a folder of raw pictures → a Kohya repeat folder, resumable and safe for the originals."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from lorasmith.prep.captions import orphan_captions, sync_captions
from lorasmith.common.files import StorageError, clear_stale_parts, is_disk_full, sha256_file, storage_message
from lorasmith.common.layout import (RepeatFolder, display, output_stems, repeat_folder_name, repeat_folders,
                                   scan_sources)
from lorasmith.common.lock import RunLock
from lorasmith.prep.picture import Outcome, PrepOptions, prepare_picture
from lorasmith.prep.report import Journal, Report, load_report, save_report
from lorasmith.common.sizing import auto_repeats
from lorasmith.common.stop import worker_signals


class UsageError(Exception):
    """The command cannot start as asked; the message says what to change."""


@dataclass
class FolderResult:
    report: Report
    folder: Path | None
    report_path: Path
    reused: int = 0
    fresh: set[str] = field(default_factory=set)
    messages: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """Problems beside the pictures themselves (captions that could not travel, say), each naming its file."""


def validate_paths(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise UsageError(f"SRC {src} is not a folder: give the folder that holds your pictures")
    if dst.resolve() == src.resolve():
        raise UsageError(f"--out {dst} is SRC itself: give a separate folder so the originals stay untouched")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"--out {dst} is a file: give a folder")


def find_concept_folder(dst: Path, name: str) -> RepeatFolder | None:
    """The `<n>_<name>` folder an earlier run made in `dst`, renamed in place when the repeat count changes."""
    if not dst.is_dir():
        return None
    mine = [f for f in repeat_folders(dst) if f.tokens == name]
    if len(mine) > 1:
        listed = ", ".join(f.path.name for f in mine)
        raise UsageError(f"{dst} holds several folders for {name!r} ({listed}): keep one, or pick another --out")
    return mine[0] if mine else None


def _rel(path: Path, src: Path) -> str:
    return path.relative_to(src).as_posix()


def _reusable(prev: Outcome | None, source: Path, folder: Path, stem: str, same_setup: bool) -> bool:
    """Whether an earlier outcome still describes `source` exactly, so its work need not be done again."""
    if prev is None or not same_setup or prev.status == "failed":
        return False
    if prev.status == "skipped" and (prev.reason or "").startswith("exact duplicate"):
        return False  # the picture it duplicated may have changed since
    try:
        stat = source.stat()
    except OSError:
        return False
    if prev.status == "written" and (prev.output != f"{stem}.png" or not (folder / prev.output).is_file()):
        return False
    if prev.bytes == stat.st_size and prev.mtime_ns == stat.st_mtime_ns:
        return True
    try:
        if prev.bytes != stat.st_size or sha256_file(source) != prev.sha256:
            return False
    except OSError:
        return False  # unreadable now: the worker reports why
    prev.mtime_ns = stat.st_mtime_ns  # touched, not changed
    return True


def _work(job: tuple[Path, Path, PrepOptions, Outcome]) -> Outcome:
    return prepare_picture(*job)


def _results(jobs: list, workers: int) -> Iterator[Outcome]:
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_work, jobs)
        return
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with context.Pool(min(workers, len(jobs)), initializer=worker_signals) as pool:
        yield from pool.imap(_work, jobs, chunksize=1)


def _open_destination(dst: Path) -> RunLock:
    """Create DST and take its lock; a folder that cannot be written is a usage error, said once."""
    lock = RunLock(dst, "prep-images")
    try:
        lock.acquire()
    except PermissionError as exc:
        raise UsageError(f"cannot write into --out {dst}: {exc.strerror}; choose a folder you can write to") from None
    except OSError as exc:
        if is_disk_full(exc):
            raise StorageError(storage_message(exc, lock.path)) from None
        raise UsageError(f"cannot write into --out {dst}: {exc.strerror or exc}") from None
    return lock


def prepare_folder(
    src: Path,
    dst: Path,
    name: str,
    options: PrepOptions,
    repeats: int | None = None,
    workers: int = 1,
    progress: bool = True,
) -> FolderResult:
    """Prepare every picture below `src` into `dst/<repeats>_<name>/` and write `dst/prep_report.json`.

    `repeats=None` means Kohya's guidance for however many pictures end up written. Pictures that an
    earlier run already prepared with the same options are not touched again. One run at a time per
    `dst` (a second one gets Busy); a full disk ends the run with StorageError, every finished picture kept.
    """
    validate_paths(src, dst)
    scan = scan_sources(src, exclude=[dst])
    if not (scan.files or scan.special or scan.unlistable):
        raise UsageError(f"SRC {src} holds no files to prepare (hidden files and captions are not pictures)")
    lock = _open_destination(dst)
    try:
        return _prepare(src, dst, name, options, repeats, workers, progress, scan)
    finally:
        lock.release()


def _prepare(src, dst, name, options, repeats, workers, progress, scan) -> FolderResult:
    sources = scan.files
    existing = find_concept_folder(dst, name)
    folder = existing.path if existing else dst / repeat_folder_name(repeats or auto_repeats(len(sources)), name)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    for place in (dst, folder):
        clear_stale_parts(place)

    previous = load_report(dst)
    same_setup = bool(previous and previous.options == options.fingerprint() and previous.src == str(src.resolve()))
    prev_by_source = {e.source: e for e in previous.entries} if previous else {}
    report = Report(str(src.resolve()), None, name, None, options.fingerprint())
    earlier = {src / e.source: Path(e.output).stem for e in prev_by_source.values() if e.output}
    gone = [stem for path, stem in earlier.items() if not path.exists() and (folder / f"{stem}.png").is_file()]
    stems = output_stems(sources, src, earlier, reserved=gone)

    plan, jobs = _schedule(sources, src, folder, stems, prev_by_source, same_setup, options)
    result = FolderResult(report, folder, dst / "prep_report.json")
    journal = None
    try:
        journal = Journal(dst, report.src, name, report.options)
        _run_jobs(sources, src, plan, jobs, workers, progress, folder, stems, journal, result)
        for status, found in (("skipped", scan.special), ("failed", scan.unlistable)):
            for path, reason in found:
                outcome = Outcome(_rel(path, src), status, reason)
                report.entries.append(outcome)
                journal.add(outcome)
        _retire_old_outputs(previous, report, folder, src, result)
        if made and _drop_if_empty(folder):
            result.folder = None
        else:
            folder = _rename_for_repeats(dst, folder, name, repeats, report)
            result.folder = folder
            result.warnings += [f"{display(folder / c)}: {why}" for c, why in orphan_captions(folder)]
        result.report_path = save_report(dst, report)
        journal.close(delete=True)
    except OSError as exc:  # reading is per picture in the workers: what fails here is a write to DST
        raise StorageError(storage_message(exc, Path(exc.filename) if exc.filename else folder)) from None
    finally:
        for job in jobs:  # temporary outputs of workers stopped mid-picture
            job[1].unlink(missing_ok=True)
        if journal is not None:
            journal.close(delete=False)
        if made:
            _drop_if_empty(folder)
    return result


def _drop_if_empty(folder: Path) -> bool:
    """Remove a repeat folder this run made once nothing ended up in it, so a failed run leaves no empty
    `<repeats>_<name>/` that looks like a dataset; whether it was removed."""
    try:
        folder.rmdir()  # refused for a folder that holds anything
    except OSError:
        return False
    return True


def _run_jobs(sources, src, plan, jobs, workers, progress, folder, stems, journal, result) -> None:
    """Settle every source in order: reuse what still holds, take the workers' results for the rest."""
    kept: dict[str, str] = {}
    fresh = _results(jobs, workers)
    job_iter = iter(jobs)
    bar = tqdm(total=len(sources), desc="prep-images", unit="img", disable=not progress, file=sys.stderr)
    try:
        for source, planned in zip(sources, plan):
            if planned is not None:
                outcome, temp = planned, None
            else:
                temp = next(job_iter)[1]
                try:
                    outcome = next(fresh)
                except OSError as exc:  # a worker's write failed for a reason of the disk
                    exc.filename = exc.filename or str(folder / f"{stems[source]}.png")
                    raise
                result.fresh.add(outcome.source)
            _settle(outcome, temp, folder, stems[source], kept)
            result.reused += planned is not None and outcome.status == "written"
            if outcome.status == "written":
                outcome.captions, problems = sync_captions(source, folder / outcome.output, outcome.captions)
                result.warnings += [f"{display(_rel(source, src))}: {p}" for p in problems]
            result.report.entries.append(outcome)
            journal.add(outcome)
            bar.update(1)
    finally:
        bar.close()
        fresh.close()


def _schedule(sources: list[Path], src: Path, folder: Path, stems: dict[Path, str], previous: dict[str, Outcome],
              same_setup: bool, options: PrepOptions) -> tuple[list[Outcome | None], list[tuple]]:
    """Per source, the earlier outcome that still holds (None where the picture must be prepared), and the
    worker jobs for the rest, each with a fresh outcome that already knows the file's size and hash."""
    plan: list[Outcome | None] = []
    jobs = []
    for source in sources:
        rel = _rel(source, src)
        prev = previous.get(rel)
        if _reusable(prev, source, folder, stems[source], same_setup):
            plan.append(prev)
            continue
        outcome = Outcome(rel, "failed")
        try:
            stat = source.stat()
            outcome.bytes, outcome.mtime_ns = stat.st_size, stat.st_mtime_ns
            outcome.sha256 = sha256_file(source)
        except OSError:
            pass  # the worker reports why it cannot be read
        jobs.append((source, folder / f".{stems[source]}.png.{os.getpid()}.w.part", options, outcome))
        plan.append(None)
    return plan, jobs


def _settle(outcome: Outcome, temp: Path | None, folder: Path, stem: str, kept: dict[str, str]) -> None:
    """Move a fresh output into place, unless an earlier source had exactly the same pixels."""
    duplicate_of = kept.get(outcome.pixel_hash) if outcome.status == "written" else None
    if duplicate_of is not None:
        outcome.status, outcome.reason = "skipped", f"exact duplicate of {duplicate_of}"
        if temp is not None:
            temp.unlink(missing_ok=True)
        elif outcome.output and (folder / outcome.output).is_file():
            (folder / outcome.output).unlink()
        outcome.output = None
        return
    if outcome.status == "written":
        kept[outcome.pixel_hash] = outcome.source
        outcome.output = f"{stem}.png"
        if temp is not None:
            os.replace(temp, folder / outcome.output)


def _retire_old_outputs(
    previous: Report | None, report: Report, folder: Path, src: Path, result: FolderResult
) -> None:
    """Remove outputs of ours that no entry claims any more because their picture is now deliberately left
    out (an exact duplicate, a skip).

    Outputs stay when their source has vanished or fails to read now: they may be the only good copy of
    the user's picture left.
    """
    if previous is None:
        return
    claimed = {e.output for e in report.entries if e.output}
    now = {e.source: e for e in report.entries}
    orphans = kept_failed = 0
    for entry in previous.entries:
        if not entry.output or entry.output in claimed or not (folder / entry.output).is_file():
            continue
        current = now.get(entry.source)
        if current is None:
            orphans += 1
        elif current.status == "failed":
            kept_failed += 1
        else:
            (folder / entry.output).unlink()
    if orphans:
        result.messages.append(
            f"{orphans} output(s) in {folder.name} have no source in {src} any more; they were left in place"
        )
    if kept_failed:
        result.messages.append(f"{kept_failed} output(s) in {folder.name} were kept from an earlier run although "
                               "their source cannot be read now (see the errors above)")


def _rename_for_repeats(dst: Path, folder: Path, name: str, repeats: int | None, report: Report) -> Path:
    """The concept folder renamed to the final repeat count (auto repeats follow the pictures written)."""
    final_repeats = repeats or auto_repeats(report.counts()["written"])
    final = dst / repeat_folder_name(final_repeats, name)
    if final != folder:
        if final.exists():
            raise UsageError(f"cannot rename {folder.name} to {final.name}: {final} already exists")
        folder.rename(final)
    report.folder, report.repeats = final.name, final_repeats
    return final
