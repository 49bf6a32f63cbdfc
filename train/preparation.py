"""What a run settles before any model loads: its dataset, its plan, the folders it must never read back as
data, and the resolved preset beside the outputs; `--dry-run` stops here."""

from __future__ import annotations

import os
from pathlib import Path

from lorasmith.common.files import write_text_atomic
from lorasmith.train.config import Config, to_toml
from lorasmith.train.dataset import Dataset, load_dataset
from lorasmith.train.events import RunPaths
from lorasmith.train.plan import Plan, bucket_resolutions, make_plan
from lorasmith.train.validation import split_validation


def world() -> tuple[int, int]:
    """(rank, processes) as `accelerate launch` sets them, known before any model loads."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def own_outputs(config: Config) -> tuple[Path, ...]:
    """The folders this run writes, which must never be read back as data (an output_name like `5_x` makes
    `5_x.samples/` look like a repeat folder)."""
    paths = RunPaths.of(config)
    out = Path(config.output.output_dir)
    inside = [out] if out.resolve() != Path(config.dataset.train_data_dir).resolve() else []
    return (paths.states, paths.samples, paths.logs, *inside)


def plan_run(config: Config) -> tuple[Dataset, Plan]:
    d, t = config.dataset, config.training
    buckets = bucket_resolutions(d.resolution, d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps)
    dataset = load_dataset(Path(d.train_data_dir), Path(d.reg_data_dir) if d.reg_data_dir else None,
                           d.caption_extension, buckets, own_outputs(config))
    dataset.items, dataset.validation, warning = split_validation(dataset.items, d.validation_split, t.seed)
    if warning:
        dataset.warnings.append(warning)
    plan = make_plan(dataset.bucket_counts(), dataset.bucket_counts(reg=True), len(dataset.items),
                     len(dataset.reg_items), t.train_batch_size, t.gradient_accumulation_steps, world()[1],
                     t.max_train_epochs, t.max_train_steps, config.schedule.lr_warmup_steps,
                     config.output.save_every_n_epochs)
    plan.held_out = len(dataset.validation)
    return dataset, plan


def write_resolved_config(config: Config, plan: Plan) -> Path:
    """The preset as it was actually used (defaults and --set included), beside the outputs."""
    path = Path(config.output.output_dir) / f"{config.output.output_name}.config.toml"
    header = "# resolved train-lora preset; the plan it gave:\n" + "".join(f"# {line}\n" for line in plan.lines())
    write_text_atomic(path, header + to_toml(config))
    return path
