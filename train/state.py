"""Resumable training states on disk: written whole or not at all, found newest first, pruned to the last K.

A state is a folder `step-00000040/` under `<output_dir>/<output_name>.state/`. Its files are written into a
hidden temporary folder, each one fsynced, the manifest last (with every file's size and sha256); only then
is the folder renamed into place. A folder whose manifest is missing or does not match its files (a run
killed mid-save, a copy cut short) is never resumed from, and older states are removed only after a newer
one is complete, so a crash or a full disk never costs the last good state.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1

RESUME_SAFE = {
    "output.output_dir", "output.output_name", "output.save_every_n_epochs", "output.save_state", "output.save_state_every_n_steps",
    "output.save_last_n_states", "output.log_tensorboard", "output.trigger_phrase", "output.save_precision",
    "dataset.cache_latents_to_disk", "training.gradient_checkpointing",
}
"""Settings that may change between a run and its resumption: they change what is written or how memory is
spent, not the weights. Everything else (and the whole `[sample]` table is safe too) must match."""


class StateError(ValueError):
    """A state that cannot be resumed from, or a resume that would silently change the run."""


class SaveError(OSError):
    """Writing a state or a LoRA failed (usually a full disk); the message names the path and what survived."""


@dataclass
class Loaded:
    folder: Path
    manifest: dict
    adapters: dict
    training: dict
    history: dict
    seconds: float = 0.0
    """Time spent reading and verifying the files."""


def state_root(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / f"{name}.state"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError, path: Path, previous: Path | None) -> SaveError:
    """One sentence: which path could not be written, why, and what is still safe on disk."""
    kept = f"the previous state {previous} is intact" if previous else "no earlier state was touched"
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        try:
            free = f"{shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free / 2**20:.0f} MiB free"
        except (OSError, StopIteration):
            free = "free space unknown"
        reason = f"the disk holding {path.parent} is full ({free}) while writing {path.name}"
    else:
        reason = f"could not write {path}: {exc.strerror or exc}"
    error = SaveError(f"{reason}; {kept}. Free space or set output.output_dir to another disk, then run again "
                      "with --resume auto")
    error.errno = exc.errno
    return error


def is_complete(folder: Path) -> bool:
    """The manifest exists, parses, and every file it lists is there with the recorded size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        return manifest.get("format") == FORMAT and all(
            (folder / name).stat().st_size == entry["bytes"] for name, entry in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def states(root: Path) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) of every state folder under `root`, oldest first; temporary folders excluded."""
    found = []
    for folder in root.glob("step-*") if root.is_dir() else ():
        try:
            step = int(folder.name.split("-", 1)[1])
        except ValueError:
            continue
        if folder.is_dir():
            found.append((step, folder, is_complete(folder)))
    return sorted(found)


def latest(root: Path) -> Path | None:
    complete = [folder for _, folder, ok in states(root) if ok]
    return complete[-1] if complete else None


def write_state(root: Path, step: int, files: dict[str, bytes], info: dict, keep: int) -> Path:
    """Write `files` and a manifest with `info` as the state of `step`, then keep only the newest `keep`."""
    final = root / step_name(step)
    if is_complete(final):  # e.g. SIGTERM right after a periodic save: the same step, the same bytes
        return final
    previous = latest(root)
    tmp = root / f".{step_name(step)}.{os.getpid()}.tmp"
    current = tmp
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        entries = {}
        for name, data in files.items():
            current = tmp / name
            with open(current, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            entries[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        current = tmp / MANIFEST
        manifest = {"format": FORMAT, "step": step, **info, "files": entries}
        with open(current, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(tmp)
        current = final
        if final.exists():  # a torn folder under the real name: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise storage_error(exc, current, previous) from None
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> list[Path]:
    """Remove complete states beyond the newest `keep`, and temporary folders that no live process owns."""
    removed = []
    complete = [folder for _, folder, ok in states(root) if ok]
    for folder in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    for tmp in root.glob(".step-*.tmp") if root.is_dir() else ():
        pid = tmp.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or int(pid) == os.getpid() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return removed


def read_state(folder: Path) -> Loaded:
    """The state in `folder`, every file checked against the manifest's sha256."""
    import io
    import time

    import torch
    from safetensors.torch import load

    started = time.perf_counter()
    if not is_complete(folder):
        raise StateError(f"{folder} is not a complete training state (its {MANIFEST} is missing or does not "
                         "match its files); use --resume auto to take the newest complete one")
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    data = {}
    for name, entry in manifest["files"].items():
        data[name] = (folder / name).read_bytes()
        if hashlib.sha256(data[name]).hexdigest() != entry["sha256"]:
            raise StateError(f"{folder / name} is damaged (its sha256 differs from the manifest's); "
                             "resume from another state or delete this folder")
    training = torch.load(io.BytesIO(data["training.pt"]), map_location="cpu", weights_only=True)
    return Loaded(folder, manifest, load(data["adapters.safetensors"]), training,
                  json.loads(data["history.json"]), time.perf_counter() - started)


# -- what a resumed run must share with the run that wrote the state ------------------------------------
def config_fingerprint(config, processes: int) -> dict[str, object]:
    """The preset flattened to `section.key` → value, without the settings a resume may change, and the
    number of processes (it decides which batches each one sees)."""
    flat: dict[str, object] = {"processes": processes}
    for section, values in dataclasses.asdict(config).items():
        if not isinstance(values, dict):
            flat[section] = values
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            if name not in RESUME_SAFE and section != "sample":
                flat[name] = value
    return flat


def dataset_fingerprint(dataset) -> dict[str, str]:
    """Picture path → content hash, caption hash, repeats and role: what the data order and loss depend on."""
    out, held_out = {}, set(dataset.validation)
    for item in [*dataset.items, *dataset.reg_items, *dataset.validation]:
        caption = hashlib.sha256(item.caption.encode()).hexdigest()[:12]
        role = "reg" if item.is_reg else "validation" if item in held_out else "train"
        out[str(item.image)] = f"{item.content[:16]} {caption} {item.repeats} {role}"
    return out


def describe_changes(old_config: dict, new_config: dict, old_data: dict, new_data: dict, limit: int = 5) -> list[str]:
    """Human lines for what differs between the state's run and this one; empty when they match."""
    lines = []
    for key in sorted(set(old_config) | set(new_config)):
        if old_config.get(key) != new_config.get(key):
            lines.append(f"preset {key}: {old_config.get(key)!r} then, {new_config.get(key)!r} now")
    added = sorted(set(new_data) - set(old_data))
    removed = sorted(set(old_data) - set(new_data))
    changed = sorted(k for k in set(old_data) & set(new_data) if old_data[k] != new_data[k])
    for label, paths in (("added", added), ("removed", removed), ("changed (picture, caption, repeats or held out)", changed)):
        if paths:
            names = ", ".join(Path(p).name for p in paths[:limit]) + (" ..." if len(paths) > limit else "")
            lines.append(f"dataset: {len(paths)} picture(s) {label}: {names}")
    return lines


def check_resume(config, dataset, plan, loaded: Loaded, force: bool, log=print) -> None:
    """Refuse (StateError) to continue a state written by another preset or dataset, unless `force`."""
    before = {k: v for k, v in loaded.manifest.get("config", {}).items() if k not in RESUME_SAFE}
    changes = describe_changes(before, config_fingerprint(config, plan.processes), loaded.manifest.get("dataset", {}),
                               dataset_fingerprint(dataset))
    if not changes:
        return
    listing = "; ".join(changes)
    if not force:
        raise StateError(f"{loaded.folder} was written by a different run: {listing}. Undo the change, start "
                         "afresh without --resume, or add --force to continue with the new settings")
    log(f"warning: resuming with --force despite: {listing}")
