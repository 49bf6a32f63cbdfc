"""`train-lora`: a preset in, a Kohya-format LoRA out. Exit codes: 0 done, 1 training failed, 2 bad preset/usage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorasmith.prep.cli import HelpFormatter

EPILOG = """\
The plan (images, repeats, buckets, batches, steps, warmup, saves) is printed before any model loads;
--dry-run prints it and stops. Steps follow Kohya: images × repeats × epochs / batch size, each bucket
rounded up, doubled with regularisation images, divided by gradient accumulation and processes.

Multi-GPU: accelerate launch --multi_gpu --num_processes N train-lora preset.toml
(on CPU-only machines the processes use the CPU automatically).

exit codes: 0 done, 1 training failed, 2 bad preset, dataset or model (one line says which key or path).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train-lora", description="Train a LoRA from a preset TOML (see presets/).",
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("preset", type=Path, help="preset file; relative paths in it are relative to the file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a preset key, typed from the schema (repeatable), e.g. --set optimizer.learning_rate=2e-4")
    p.add_argument("--dry-run", action="store_true", help="print the plan and stop; no model is loaded")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from lorasmith.captioning.hub import ModelNotFound
    from lorasmith.train.config import ConfigError, load_config
    from lorasmith.train.dataset import DatasetError
    from lorasmith.train.models import resolve_name

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        config = load_config(args.preset, args.overrides)
        config.model.pretrained_model, notice = resolve_name(config.model.pretrained_model)
        if notice:
            log(f"note: {notice}")
        from lorasmith.train.trainer import plan_run, world

        dataset, plan = plan_run(config)
        if world()[0] == 0:
            for warning in dataset.warnings:
                log(f"warning: {warning}")
            print("\n".join(plan.lines()), flush=True)
        if args.dry_run:
            print("dry run: no model loaded, nothing written")
            return 0
        from lorasmith.train.trainer import run

        result, plan = run(config, progress=not args.quiet, log=log, planned=(dataset, plan))
    except (ConfigError, DatasetError, ModelNotFound) as exc:
        print(f"train-lora: error: {exc}", file=sys.stderr)
        return 2
    if world()[0] == 0:
        final = result.outputs[-1] if result.outputs else None
        size = f" ({final.stat().st_size / 2**20:.1f} MiB)" if final else ""
        losses = result.losses[-25:]
        t = result.timings
        print(f"train-lora: {len(result.losses)} steps, final loss (mean of last {len(losses)}) "
              f"{sum(losses) / max(1, len(losses)):.4f}; load {t.get('load', 0):.1f} s, cache {t.get('cache', 0):.1f} s, "
              f"train {t.get('train', 0):.1f} s, save {t.get('save', 0):.1f} s → {final}{size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
