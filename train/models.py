"""Loading the base model's parts from a hub id or a local diffusers folder, with one-sentence failures."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from lorasmith.captioning.hub import load_model

RENAMED = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
"""runwayml's repository was taken down; the maintained copy has the same weights."""


@dataclass
class Components:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    scheduler: Any
    name: str


def quiet_libraries() -> None:
    """Library chatter that would bury the plan, the progress bar and the summary: transformers' loading bars,
    and bitsandbytes' notice about optional 4-bit CPU kernels that LoRA training never uses."""
    import logging

    from lorasmith.captioning.blip import quiet_transformers

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    quiet_transformers()


def resolve_name(name: str) -> tuple[str, str | None]:
    """The id to load, and a notice when an old id was mapped to its maintained copy."""
    if name in RENAMED:
        return RENAMED[name], f"{name} was removed from the hub; using its maintained copy {RENAMED[name]}"
    return name, None


def load_components(name: str, parts: tuple[str, ...] = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
                    ) -> Components:
    """Each part from its subfolder, loaded once; parts not asked for stay None (and out of memory)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    quiet_libraries()
    classes = {"tokenizer": CLIPTokenizer, "text_encoder": CLIPTextModel, "vae": AutoencoderKL,
               "unet": UNet2DConditionModel, "scheduler": DDPMScheduler}
    loaded = {}
    for part in ("tokenizer", "text_encoder", "vae", "unet", "scheduler"):
        if part in parts:
            loader = functools.partial(classes[part].from_pretrained, subfolder=part)
            loaded[part] = load_model(name, loader, f"base model ({part})")
        else:
            loaded[part] = None
    return Components(name=name, **loaded)


def check_clip_skip(name: str, skip: int) -> None:
    """clip_skip against the text encoder's depth, read from its config alone, before anything is cached."""
    from transformers import CLIPTextConfig

    from lorasmith.train.config import ConfigError

    config = load_model(name, functools.partial(CLIPTextConfig.from_pretrained, subfolder="text_encoder"),
                        "base model (text_encoder)")
    if skip > config.num_hidden_layers:
        raise ConfigError(f"training.clip_skip = {skip} is more than the {config.num_hidden_layers} layers of this "
                          "model's text encoder: use 1 (realistic models) or 2 (anime models)")
