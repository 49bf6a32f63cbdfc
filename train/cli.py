"""`train-lora`: a preset in, a Kohya-format LoRA out.

Exit codes: 0 done, 1 training failed, 2 bad preset/usage/state, 75 stopped by SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorasmith.common.console import HelpFormatter

EPILOG = """\
The plan (images, repeats, buckets, batches, steps, warmup, saves) is printed before any model loads;
--dry-run prints it and stops. Steps follow Kohya: images × repeats × epochs / batch size, each bucket
rounded up, doubled with regularisation images, split over processes, then divided by gradient accumulation
and rounded up per epoch (the last, partial window still makes a step at the epoch's end).

Base models: model.pretrained_model takes a hub id, a diffusers folder or one checkpoint file (.safetensors,
or .ckpt read without unpickling code) of SD1.x, SD2.x (epsilon or v-prediction, read from the file) or
SDXL base; the family is detected and printed first. SDXL trains on both text encoders (penultimate layers,
the second's pooled output) with each picture's size and crop as conditioning, at 1024² buckets (see
presets/sdxl-*.toml; prep-images --area 1024 makes matching pictures). SDXL's VAE always runs in fp32,
whatever training.mixed_precision says: in fp16 it overflows into NaN latents and black samples.

Multi-GPU: accelerate launch --multi_gpu --num_processes N train-lora preset.toml
(on CPU-only machines the processes use the CPU automatically).

States and resuming: with output.save_state (default on) a state is written with every epoch save, every
output.save_state_every_n_steps steps, at the end and when SIGTERM or SIGINT arrives (the current step
finishes first; a second signal exits at once). States are named by step and run
(<name>.state/step-00000200-<run>/): a fresh run never prunes or resumes an earlier run's states.
`--resume auto` continues from the newest complete state written and ends with the same LoRA an
uninterrupted run would have written. A state written by another preset or dataset is refused with the
list of differences unless --force; one whose manifest was edited by hand, or whose tensors do not fit
the network (network_dim changed, say), is refused always.

Before renting a GPU: --preflight estimates the preset's peak memory on the card (by part, from one step of
its base's architecture run without weights on this machine), s/step, hours and, with --price-per-hour, cost,
for common cards; --gpu NAME shows one card in detail and exits 1 when the preset does not fit it, listing the
cheapest changes that would make it fit. --measure (on a CUDA machine) adds 10 real steps' peak and speed.

Signals before training (loading, caching latents) stop at once with 75 and nothing to resume; during the
final save the save finishes first. One run at a time per output name: a second one is refused (exit 2).

Beside the LoRA: <name>.report.html (loss curves, validation, sample grids, timings; refreshed at every
save), <name>.logs/loss.csv and validation.csv (and TensorBoard events when tensorboard is installed),
<name>.samples/ and <name>.state/.

exit codes:
  0   done
  1   training failed: non-finite loss, disk full (the path and free space named), or an unexpected error
  2   bad preset (a key out of range), dataset, model or state (one line names the key or path), or the
      output in use by another train-lora
  75  stopped by SIGTERM/SIGINT: after writing a state, run again with --resume auto; before training
      began, run the same command again (EX_TEMPFAIL)
  130/143  a second SIGINT/SIGTERM: exited at once, nothing written after the last state
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train-lora", description="Train a LoRA from a preset TOML (see presets/).",
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("preset", type=Path, help="preset file; relative paths in it are relative to the file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a preset key, typed from the schema (repeatable), e.g. --set optimizer.learning_rate=2e-4")
    p.add_argument("--resume", metavar="auto|STATE", default=None,
                   help="continue from the newest complete state (auto; a fresh start when there is none) "
                        "or from a state folder such as out/name.state/step-00000200 (default: start afresh)")
    p.add_argument("--force", action="store_true",
                   help="resume even though the preset or dataset changed since the state was written")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop; no model is loaded")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--preflight", action="store_true",
                   help="before renting a GPU: the preset's peak memory, s/step, hours (and cost) on common cards, "
                        "estimated from the base's configs on this machine (no GPU, no weights, nothing trained)")
    p.add_argument("--gpu", metavar="NAME", help="with --preflight: one card in detail (4090, A100-80GB, H100, ...); "
                                                 "exit 1 when the preset does not fit it")
    p.add_argument("--price-per-hour", type=float, metavar="X", help="with --preflight: the card's hourly price")
    p.add_argument("--family", choices=("sd1", "sd2", "sdxl", "flux"),
                   help="with --preflight: estimate with this family's public architecture (a hub base not on "
                        "this machine; flux is FLUX.1-dev)")
    p.add_argument("--measure", action="store_true",
                   help="with --preflight, on a CUDA machine: also run 10 real steps and print the measured peak "
                        "memory and s/step beside the estimate")
    return p


def _preflight_usage(args) -> str | None:
    """The preflight options' own rules: they apply only to --preflight, and a price is a positive number."""
    if not args.preflight and (args.gpu or args.price_per_hour is not None or args.family):
        return "--gpu, --price-per-hour and --family apply to --preflight only"
    if args.price_per_hour is not None and not (0 < args.price_per_hour < float("inf")):
        return f"--price-per-hour {args.price_per_hour:g}: give the card's hourly price, a positive number"
    return None


def newest_state(config):
    """The state --resume auto would take now, for messages after a failure."""
    from lorasmith.train.state import latest, state_root

    return latest(state_root(config.output.output_dir, config.output.output_name))


def take_lock(config):
    """One run per output name: a second train-lora into the same files is refused, naming the first."""
    from lorasmith.common.files import is_disk_full, make_output_folder
    from lorasmith.common.lock import RunLock
    from lorasmith.train.config import ConfigError
    from lorasmith.train.state import storage_error

    out = Path(config.output.output_dir)
    lock = RunLock(out, "train-lora", f".{config.output.output_name}.lock")
    try:
        if not out.exists():  # made for outputs only: marked so that no dataset reader enters it
            make_output_folder(out)
        lock.acquire()
    except OSError as exc:
        if is_disk_full(exc):
            raise storage_error(exc, lock.path, None) from None
        raise ConfigError(f"output.output_dir = {config.output.output_dir} cannot be written ({exc.strerror or exc}): "
                          "choose a folder you can write to") from None
    return lock


def earlier_runs_note(config, state) -> str | None:
    """A note when the state folder holds states of runs other than the one that goes on."""
    from lorasmith.train.state import states, state_root

    root = state_root(config.output.output_dir, config.output.output_name)
    mine = state.manifest.get("run") if state is not None else None
    others = [f for f in states(root) if f.complete and f.run != mine]
    if not others:
        return None
    runs = sorted({f.run or "unnamed" for f in others})
    return (f"{root} also holds {len(others)} state(s) of {len(runs)} other run(s) ({', '.join(runs[:3])}); "
            "they are kept as they are: delete them when you no longer need them")


def summary_line(result) -> str:
    final = result.outputs[-1] if result.outputs else None
    size = f" ({final.stat().st_size / 2**20:.1f} MiB)" if final else ""
    losses = result.losses[-25:]
    t = result.timings
    validation = f", validation {result.validation[-1]:.4f}" if result.validation else ""
    return (f"train-lora: {len(result.losses)} steps, final loss (mean of last {len(losses)}) "
            f"{sum(losses) / max(1, len(losses)):.4f}{validation}; load {t.get('load', 0):.1f} s, "
            f"cache {t.get('cache', 0):.1f} s, train {t.get('train', 0):.1f} s, save {t.get('save', 0):.1f} s "
            f"→ {final}{size}; report {result.report}")


def _train(args, rank: int, log, held: dict):
    """Preset → plan → (unless --dry-run) lock, resume checks and the run; `held` keeps the config, state
    and lock for the messages and clean-up of main()."""
    from lorasmith.train.config import load_config
    from lorasmith.models.families import FAMILIES
    from lorasmith.models.base import describe_base, resolve_name
    from lorasmith.train.state import check_resume, load_resume
    from lorasmith.train.trainer import plan_run, run

    held["config"] = config = load_config(args.preset, args.overrides)
    config.model.pretrained_model, notice = resolve_name(config.model.pretrained_model)
    if notice:
        log(f"note: {notice}")
    # a file that is no base model fails before the scan
    base = describe_base(config.model.pretrained_model, FAMILIES)
    dataset, plan = plan_run(config)
    if rank == 0:
        for warning in dataset.warnings:
            log(f"warning: {warning}")
        print("\n".join(([base] if base else []) + plan.lines()), flush=True)
    if args.dry_run:
        print("dry run: no model loaded, nothing written (--preflight estimates memory, time and cost per GPU)")
        return None
    held["lock"] = take_lock(config) if rank == 0 else None
    held["state"] = state = load_resume(config, args.resume, log)
    if args.resume == "auto" and state is None:
        log("note: --resume auto found no complete state; starting afresh")
    if state is not None:
        check_resume(config, dataset, plan, state, args.force, log)
    note = earlier_runs_note(config, state) if rank == 0 else None
    if note:
        log(f"note: {note}")
    return run(config, progress=not args.quiet, log=log, planned=(dataset, plan), resume=state)[0]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.preflight = args.preflight or args.measure
    problem = _preflight_usage(args)
    if problem:
        print(f"train-lora: error: {problem}", file=sys.stderr)
        return 2
    import logging

    from lorasmith.common.console import printable_output

    printable_output()
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from lorasmith.common.hub import ModelNotFound
    from lorasmith.common.lock import Busy
    from lorasmith.train.config import ConfigError
    from lorasmith.train.dataset import DatasetError
    from lorasmith.train.events import NonFiniteLoss, Preempted
    from lorasmith.train.signals import PREEMPTED_EXIT, Interrupted, StopSignals
    from lorasmith.models.single_file import CheckpointError
    from lorasmith.train.state import SaveError, StateError
    from lorasmith.train.preparation import world

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    if args.preflight:
        return _preflight(args)
    rank = world()[0]
    held: dict = {"config": None, "state": None, "lock": None}
    try:
        with StopSignals(None if rank == 0 else (lambda message: None)) as signals:
            signals.phase = "reading the preset and the dataset"
            result = _train(args, rank, log, held)
    except (ConfigError, DatasetError, ModelNotFound, StateError, Busy, CheckpointError) as exc:
        print(f"train-lora: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        if rank == 0:
            state = held["state"]
            then = (f"--resume auto continues from {state.folder} as before" if state is not None
                    else "nothing to resume from this run: run the same command again")
            print(f"train-lora: stopped by {stop.name} while {stop.phase}, before training began; {then}",
                  file=sys.stderr)
        return PREEMPTED_EXIT
    except Preempted as exc:
        if rank == 0:  # every process stops; the one that wrote the state says so
            print(f"train-lora: {exc}; continue with: train-lora {args.preset} --resume auto", file=sys.stderr)
        return PREEMPTED_EXIT
    except (NonFiniteLoss, SaveError) as exc:
        kept = newest_state(held["config"])
        where = f"The last good state is {kept} (--resume auto continues from it)." if kept else "No state was saved."
        print(f"train-lora: error: {exc} {where if isinstance(exc, NonFiniteLoss) else ''}".rstrip(), file=sys.stderr)
        return 1
    finally:
        if held["lock"] is not None:
            held["lock"].release()
    if result is not None and rank == 0:
        print(summary_line(result))
    return 0


def _preflight(args) -> int:
    """--preflight: an estimate, never a run; every failure to estimate is one sentence and exit 2."""
    from lorasmith.common.hub import ModelNotFound
    from lorasmith.models.single_file import CheckpointError
    from lorasmith.train.config import ConfigError
    from lorasmith.train.gpus import CardError
    from lorasmith.train.architectures import PreflightError
    from lorasmith.train.preflight_report import run_preflight

    try:
        return run_preflight(args)
    except (ConfigError, PreflightError, CardError, ModelNotFound, CheckpointError) as exc:
        print(f"train-lora: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
