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
