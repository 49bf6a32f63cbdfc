"""The held-out split and the fixed timesteps of the validation loss.

Training loss is drawn at random timesteps with fresh noise, so two epochs' values differ by chance as much
as by learning. The validation loss uses the same pictures, the same noise and the same timesteps every
time, on pictures training never sees: when it turns upward while the training loss keeps falling, the
LoRA has begun to memorise its dataset.
"""

from __future__ import annotations

import random

TIMESTEPS = (100, 300, 500, 700, 900)
"""Spread over the schedule: low timesteps judge detail, high ones composition."""
NOISE_SEED = 1_000_003


def split_validation(items: list, fraction: float, seed: int) -> tuple[list, list, str | None]:
    """(training items, held-out items, warning). At least one picture is held out when `fraction` > 0 and
    at least one stays for training; the choice depends only on the seed and the sorted file names."""
    if fraction <= 0:
        return items, [], None
    if len(items) < 2:
        return items, [], f"validation_split = {fraction} needs at least 2 pictures; no validation loss this run"
    ordered = sorted(items, key=lambda item: str(item.image))
    count = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = set(random.Random(seed).sample(range(len(ordered)), count))
    return ([item for i, item in enumerate(ordered) if i not in held],
            [item for i, item in enumerate(ordered) if i in held], None)
