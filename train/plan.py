"""Pure arithmetic of a training run: buckets, batches, steps, warmup and saves. Printed before any model loads."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def bucket_resolutions(resolution: int = 512, min_reso: int = 256, max_reso: int = 1024, step: int = 64
                       ) -> list[tuple[int, int]]:
    """Kohya's bucket set: every (w, h) in `step`s with area at most `resolution`², both orientations."""
    max_area = resolution * resolution
    sizes = set()
    width = math.ceil(min_reso / step) * step
    while width <= max_reso:
        height = min(max_reso, (max_area // width) // step * step)
        if height >= min_reso:
            sizes.update({(width, height), (height, width)})
        width += step
    if not sizes:
        raise ValueError(f"no bucket fits between {min_reso} and {max_reso} at resolution {resolution}")
    return sorted(sizes)


def assign_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The picture's own size when it is a bucket (prep's outputs usually are); else the closest aspect ratio,
    the larger area on ties. The picture is then resized to cover the bucket and centre-cropped."""
    if size in buckets:
        return size
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


def batches_per_epoch(bucket_items: dict[tuple[int, int], int], batch_size: int) -> int:
    """Each bucket is batched on its own and its last batch may be short: Σ ceil(items / batch)."""
    return sum(math.ceil(n / batch_size) for n in bucket_items.values() if n)


def closes_window(index: int, per_process: int, accumulation: int) -> bool:
    """Whether micro-batch `index` (from 0) of an epoch of `per_process` ends an accumulation window: every
    `accumulation`-th does, and so does the epoch's last, so a partial window still steps (Kohya's count;
    accelerate also syncs at its dataloader's end) and no gradient is carried into the next epoch."""
    return (index + 1) % accumulation == 0 or index + 1 == per_process


def steps_done(epoch: int, batch: int, per_process: int, accumulation: int) -> int:
    """Optimizer steps taken once `batch` micro-batches of epoch `epoch` (from 1) are consumed: whole epochs
    count ceil(per_process / accumulation) each, as in `make_plan`."""
    return (epoch - 1) * math.ceil(per_process / accumulation) + math.ceil(batch / accumulation)


def warmup_steps(value: float, total: int) -> int:
    """`lr_warmup_steps` below 1 is a fraction of all steps (0.1 = 10 %), 1 or more a step count."""
    return round(value * total) if 0 < value < 1 else int(value)


@dataclass
class Plan:
    images: int
    reg_images: int
    image_views: int
    """Training images × repeats: what one epoch shows (regularisation doubles the batches, not this)."""
    buckets: dict[tuple[int, int], int]
    batch_size: int
    batches_per_epoch: int
    processes: int
    accumulation: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    warmup: int
    save_epochs: list[int] = field(default_factory=list)
    held_out: int = 0
    """Pictures kept out of training for the validation loss (not counted in `images`)."""

    def lines(self) -> list[str]:
        buckets = ", ".join(f"{w}×{h}: {n}" for (w, h), n in sorted(self.buckets.items()))
        reg = f" + {self.reg_images} regularisation images (batches doubled)" if self.reg_images else ""
        reg += f"; {self.held_out} more held out for the validation loss" if self.held_out else ""
        per_process = f" over {self.processes} processes" if self.processes > 1 else ""
        saves = ", ".join(map(str, self.save_epochs[:12])) if self.save_epochs else "the end only"
        if len(self.save_epochs) > 12:
            saves += f", ... ({len(self.save_epochs)} saves, every {self.save_epochs[0]} epochs)"
        return [
            f"images: {self.images}{reg}; {self.image_views} image views per epoch",
            f"buckets (items per epoch): {buckets}",
            f"batches per epoch: {self.batches_per_epoch} at batch size {self.batch_size} (each bucket rounded up)"
            f"{per_process}; gradient accumulation {self.accumulation}",
            (f"optimizer steps: {self.steps_per_epoch} per epoch × {self.epochs} epochs = {self.total_steps}"
             if self.total_steps == self.steps_per_epoch * self.epochs else
             f"optimizer steps: {self.total_steps} (max_train_steps; {self.steps_per_epoch} per epoch, "
             f"{self.epochs} epoch(s) begun)") + f"; warmup {self.warmup}",
            f"saves after epochs: {saves}",
        ]


def make_plan(
    train_buckets: dict[tuple[int, int], int],
    reg_buckets: dict[tuple[int, int], int],
    images: int,
    reg_images: int,
    batch_size: int,
    accumulation: int = 1,
    processes: int = 1,
    epochs: int = 10,
    max_steps: int = 0,
    warmup: float = 0.0,
    save_every: int = 0,
) -> Plan:
    """Steps as Kohya counts them: images × repeats × epochs / batch (×2 with regularisation), each bucket
    rounded up, batches split over processes, then divided by gradient accumulation and rounded up (each
    epoch's last, partial window is a step: `closes_window`).

    `max_steps` > 0 overrides `epochs` (the epochs then needed are reported).
    """
    buckets = {size: train_buckets.get(size, 0) + reg_buckets.get(size, 0) for size in {*train_buckets, *reg_buckets}}
    batches = batches_per_epoch(buckets, batch_size)
    per_process = math.ceil(batches / processes)
    steps_per_epoch = max(1, math.ceil(per_process / accumulation))
    if max_steps > 0:
        total, epochs = max_steps, math.ceil(max_steps / steps_per_epoch)
    else:
        total = steps_per_epoch * epochs
    saves = list(range(save_every, epochs, save_every)) if save_every else []
    return Plan(images, reg_images, sum(train_buckets.values()), buckets, batch_size, batches, processes,
                accumulation, steps_per_epoch, epochs, total, warmup_steps(warmup, total), saves)
