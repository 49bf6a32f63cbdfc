"""Resumable training states on disk: written whole or not at all, found newest first, pruned to the last K.

A state is a folder `step-00000040-<run>/` under `<output_dir>/<output_name>.state/`, where `<run>` names the
run that wrote it: a fresh run into the same output never prunes, overwrites or resumes an earlier run's
states by mistake. Its files are written into a hidden temporary folder, each one fsynced, the manifest last
(with every file's size and sha256); only then is the folder renamed into place. A folder whose manifest is
missing or does not match its files (a run killed mid-save, a copy cut short) is never resumed from, and a
run's older states are removed only after a newer one is complete, so a crash or a full disk never costs
the last good state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from lorasmith.common.files import alive, make_output_folder, storage_message
from lorasmith.train.plan import steps_done

MANIFEST = "manifest.json"
FORMAT = 1
_NAME = re.compile(r"^step-(\d+)(?:-([0-9a-f]+))?$")

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
    forced: bool = False
    """Accepted with --force although the preset or dataset changed."""


class Found(NamedTuple):
    step: int
    folder: Path
    complete: bool
    run: str
    """The identity of the run that wrote it ('' for states that predate run identities)."""
    written: float
    """When it was written (seconds since the epoch), which orders states across runs."""


def new_run_id() -> str:
    """Eight hex digits naming a run: its states carry it, and the LoRA's ss_session_id is its value."""
    return secrets.token_hex(4)


def state_root(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / f"{name}.state"


def step_name(step: int, run: str) -> str:
    return f"step-{step:08d}-{run}"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError, path: Path, previous: Path | None) -> SaveError:
    """One sentence: which path could not be written, why, and what is still safe on disk."""
    kept = f"the previous state {previous} is intact" if previous else "no earlier state was touched"
    error = SaveError(f"{storage_message(exc, path)}; {kept}. Free space or set output.output_dir to another "
                      "disk, then run again with --resume auto")
    error.errno = exc.errno
    return error


def _manifest(folder: Path) -> dict | None:
    """The manifest when it parses and every file it lists is there with the recorded size; else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        ok = manifest.get("format") == FORMAT and all(
            (folder / name).stat().st_size == entry["bytes"] for name, entry in files.items())
        return manifest if ok else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def is_complete(folder: Path) -> bool:
    return _manifest(folder) is not None


def states(root: Path) -> list[Found]:
    """Every state folder under `root`, oldest written first; temporary folders excluded."""
    found = []
    for folder in root.glob("step-*") if root.is_dir() else ():
        match = _NAME.match(folder.name)
        if not match or not folder.is_dir():
            continue
        manifest = _manifest(folder)
        written = manifest.get("written") if manifest else None
        if not isinstance(written, (int, float)):
            try:
                written = (folder / MANIFEST).stat().st_mtime
            except OSError:
                written = 0.0
        found.append(Found(int(match.group(1)), folder, manifest is not None, match.group(2) or "", float(written)))
    return sorted(found, key=lambda f: (f.written, f.step))


def latest(root: Path, run: str | None = None) -> Path | None:
    """The complete state written last (of `run`, when given): what --resume auto continues."""
    complete = [f.folder for f in states(root) if f.complete and (run is None or f.run == run)]
    return complete[-1] if complete else None


def write_state(root: Path, step: int, files: dict[str, bytes], info: dict, keep: int, run: str) -> Path:
    """Write `files` and a manifest with `info` as run `run`'s state of `step`, then keep only that run's
    newest `keep`. Another run's states are never touched."""
    final = root / step_name(step, run)
    previous = latest(root)
    tmp = root / f".{final.name}.{os.getpid()}.tmp"
    aside = root / f".{final.name}.old.{os.getpid()}.tmp"
    current = tmp
    try:
        make_output_folder(root)
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
        manifest = {"format": FORMAT, "step": step, "run": run, "written": time.time(), **info, "files": entries}
        with open(current, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(tmp)
        current = final
        if final.exists():  # this run reached the same step again (resumed from an older state): replace it
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        raise storage_error(exc, current, previous) from None
    shutil.rmtree(aside, ignore_errors=True)
    prune(root, keep, run)
    return final


def prune(root: Path, keep: int, run: str) -> list[Path]:
    """Remove run `run`'s complete states beyond its newest `keep`, and temporary folders no live process
    owns. States of other runs stay: a fresh run into the same output never deletes an earlier run's work."""
    removed = []
    mine = [f.folder for f in states(root) if f.complete and f.run == run]
    for folder in mine[: max(0, len(mine) - keep)]:
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    clear_temps(root)
    return removed


def clear_temps(root: Path) -> None:
    """Temporary state folders (`.step-….<pid>.tmp`) whose process is no longer alive, or is this one."""
    for tmp in root.glob(".step-*.tmp") if root.is_dir() else ():
        pid = tmp.name.rsplit(".", 2)[-2]
        if not pid.isdigit() or int(pid) == os.getpid() or not alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _check_manifest(folder: Path, manifest: dict) -> None:
    """A manifest whose fields have the right shape, and whose step agrees with its folder's name and its
    own data position: a hand-edited step would resume with the wrong schedule and data."""

    def whole(value, low: int = 0) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    step, position = manifest.get("step"), manifest.get("position")
    shape_ok = (whole(step) and isinstance(position, list) and len(position) == 2 and whole(position[0], 1)
                and whole(position[1]) and isinstance(manifest.get("config", {}), dict)
                and isinstance(manifest.get("dataset", {}), dict))
    if not shape_ok:
        raise StateError(f"{folder / MANIFEST} is damaged or was edited by hand (step, position, config or "
                         "dataset missing or malformed); resume from another state or start afresh")
    match = _NAME.match(folder.name)
    named = int(match.group(1)) if match else step
    per_process, accumulation = manifest.get("per_process"), manifest.get("accumulation", 1)
    counted = whole(per_process, 1) and whole(accumulation, 1) and not manifest.get("forced")
    expected = steps_done(position[0], position[1], per_process, accumulation) if counted else step
    if step != named or step != expected:
        raise StateError(f"{folder / MANIFEST} says step {step}, but its folder name says {named} and its data "
                         f"position (epoch {position[0]}, batch {position[1]}) means step {expected}: it was "
                         "edited by hand or damaged; resume from another state or start afresh")


def read_state(folder: Path) -> Loaded:
    """The state in `folder`, every file checked against the manifest's sha256 and the manifest against
    itself; StateError, naming the file, for anything that does not hold."""
    import io

    import torch
    from safetensors.torch import load

    started = time.perf_counter()
    manifest = _manifest(folder)
    if manifest is None:
        raise StateError(f"{folder} is not a complete training state (its {MANIFEST} is missing or does not "
                         "match its files); use --resume auto to take the newest complete one")
    _check_manifest(folder, manifest)
    data = {}
    for name, entry in manifest["files"].items():
        data[name] = (folder / name).read_bytes()
        if hashlib.sha256(data[name]).hexdigest() != entry.get("sha256"):
            raise StateError(f"{folder / name} is damaged (its sha256 differs from the manifest's); "
                             "resume from another state or delete this folder")
    readers = {"training.pt": lambda b: torch.load(io.BytesIO(b), map_location="cpu", weights_only=True),
               "adapters.safetensors": load, "history.json": json.loads}
    parts = {}
    for name, reader in readers.items():
        try:
            parts[name] = reader(data[name])
        except Exception as exc:  # any reader's failure means the same thing: this file is not what it says
            raise StateError(f"{folder / name} cannot be read as a training state ({type(exc).__name__}); "
                             "resume from another state or delete this folder") from None
    history = parts["history.json"]
    if not isinstance(history, dict) or len(history.get("loss", [])) != manifest["step"]:
        raise StateError(f"{folder / 'history.json'} does not hold one loss per step up to step "
                         f"{manifest['step']}; resume from another state or delete this folder")
    return Loaded(folder, manifest, parts["adapters.safetensors"], parts["training.pt"], history,
                  time.perf_counter() - started)


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
    now = config_fingerprint(config, plan.processes)
    # a key the state's lorasmith did not have yet ran as its default does now
    defaults = config_fingerprint(type(config)(), plan.processes)
    before.update({k: defaults[k] for k in now if k not in before and k in defaults})
    changes = describe_changes(before, now, loaded.manifest.get("dataset", {}),
                               dataset_fingerprint(dataset))
    if not changes:
        return
    listing = "; ".join(changes)
    if not force:
        raise StateError(f"{loaded.folder} was written by a different run: {listing}. Undo the change, start "
                         "afresh without --resume, or add --force to continue with the new settings")
    log(f"warning: resuming with --force despite: {listing}")
    loaded.forced = True


def check_adapters(loaded: Loaded, params: dict) -> None:
    """StateError unless the state holds exactly the network's adapter tensors, each in the network's shape:
    --force may accept a changed preset, never weights that cannot be copied in."""
    if set(params) != set(loaded.adapters):
        raise StateError(f"{loaded.folder} holds adapters for another network (rank, targets or text "
                         "encoder training differ); it cannot be resumed with this preset")
    for name, param in params.items():
        saved, wanted = list(loaded.adapters[name].shape), list(param.shape)
        if saved != wanted:
            raise StateError(f"{loaded.folder / 'adapters.safetensors'} does not fit this network: {name} is "
                             f"{saved} in the state but {wanted} in the network (network_dim or conv_dim "
                             "changed?); resume from a state of this network, or start afresh without --resume")


def load_resume(config, value: str | None, log=print) -> Loaded | None:
    """`--resume auto` → the newest complete state that reads back whole (None when there is none; a damaged
    one is named and the next older one taken); a path → that state, or StateError."""
    if not value:
        return None
    root = state_root(config.output.output_dir, config.output.output_name)
    if value == "auto":
        for found in reversed([f for f in states(root) if f.complete]):
            try:
                return read_state(found.folder)
            except StateError as exc:
                log(f"warning: {exc}; trying an older state")
        return None
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise StateError(f"--resume {value}: no such state folder (states live in {root})")
    return read_state(folder)
