"""The optimizer named in the preset, and the learning-rate schedule from diffusers' get_scheduler."""

from __future__ import annotations

from lorasmith.train.schema import ConfigError


def build_optimizer(kind: str, groups: list[dict], weight_decay: float):
    """`groups` are torch parameter groups, each with its own lr (UNet and text encoder)."""
    import torch

    if kind == "AdamW":
        return torch.optim.AdamW(groups, weight_decay=weight_decay)
    if kind in ("AdamW8bit", "Lion"):
        import bitsandbytes as bnb

        if kind == "Lion":
            return bnb.optim.Lion(groups, weight_decay=weight_decay)
        # 8-bit state for tensors of 4,096+ elements (bitsandbytes' min_8bit_size); smaller ones keep 32-bit.
        return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay)
    if kind == "Adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, relative_step=False, scale_parameter=False, warmup_init=False,
                         weight_decay=weight_decay)
    if kind == "Prodigy":
        try:
            from prodigyopt import Prodigy
        except ModuleNotFoundError:
            raise ConfigError("optimizer.optimizer_type = 'Prodigy' needs the prodigyopt package: "
                              "pip install prodigyopt (and set learning_rate = 1.0, as Prodigy expects)") from None
        return Prodigy(groups, weight_decay=weight_decay)
    raise ConfigError(f"optimizer.optimizer_type = {kind!r} is not supported")


def build_scheduler(name: str, optimizer, warmup: int, total: int, cycles: int = 1):
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total, num_cycles=cycles)
