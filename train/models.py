"""Loading the base model's parts from a hub id or a local diffusers folder, with one-sentence failures."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
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
    family: Any = None
    """single_file.Family of a checkpoint file; None for a diffusers folder or hub id."""
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    """SDXL's second text encoder (OpenCLIP-bigG with projection) and its tokenizer."""


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


def load_components(name: str, parts: tuple[str, ...] = ("tokenizer", "text_encoder", "vae", "unet", "scheduler"),
                    families: tuple[str, ...] = ("sd1", "sd2")) -> Components:
    """Each part from its subfolder (or from one checkpoint file), loaded once; parts not asked for stay None
    (and out of memory)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    quiet_libraries()
    if Path(name).expanduser().is_file():
        return _from_file(Path(name).expanduser(), name, parts, families)
    if "sdxl" not in families and (Path(name).expanduser() / "text_encoder_2").is_dir():
        from lorasmith.train.single_file import CheckpointError

        raise CheckpointError(f"{name} is an SDXL model (it has text_encoder_2); train-lora and lora run SD1.x and "
                              "SD2.x models so far: pass one of those")
    classes = {"tokenizer": CLIPTokenizer, "text_encoder": CLIPTextModel, "vae": AutoencoderKL,
               "unet": UNet2DConditionModel, "scheduler": DDPMScheduler, "tokenizer_2": CLIPTokenizer,
               "text_encoder_2": CLIPTextModelWithProjection}
    loaded = {}
    for part in classes:
        if part in parts:
            loader = functools.partial(classes[part].from_pretrained, subfolder=part)
            loaded[part] = load_model(name, loader, f"base model ({part})")
        else:
            loaded[part] = None
    return Components(name=name, **loaded)


def _from_file(path: Path, name: str, parts: tuple[str, ...], families: tuple[str, ...]) -> Components:
    from lorasmith.train import from_file

    tensors, shapes, family = from_file.open_checkpoint(path)
    refuse_unsupported(family, path.name, families)
    sdxl = family.name == "sdxl"
    loaders = {"tokenizer": lambda: from_file.tokenizer_for(family),
               "text_encoder": lambda: from_file.load_text_encoder(tensors, shapes, family, path.name),
               "vae": lambda: from_file.load_vae(tensors, shapes, path.name),
               "unet": lambda: from_file.load_unet(tensors, shapes, path.name),
               "scheduler": lambda: from_file.scheduler_for(family),
               "tokenizer_2": lambda: from_file.tokenizer_for(family, second=True) if sdxl else None,
               "text_encoder_2": lambda: from_file.load_text_encoder_2(tensors, shapes, family, path.name)
               if sdxl else None}
    return Components(name=name, family=family, **{part: loaders[part]() if part in parts else None
                                                   for part in loaders})


def refuse_unsupported(family, file_name: str, families: tuple[str, ...] = ("sd1", "sd2")) -> None:
    from lorasmith.train.single_file import CheckpointError

    if family.name not in families:
        raise CheckpointError(f"{file_name} is an {family.label} checkpoint; train-lora and lora run SD1.x and SD2.x "
                              "models so far: pass one of those")


def describe_base(name: str) -> str | None:
    """The plan's line for a checkpoint file: its family, read from tensor names and shapes alone (no weights
    load); None for a folder or hub id. Raises CheckpointError for a file that is no base model."""
    path = Path(name).expanduser()
    if not path.is_file():
        return None
    from lorasmith.train.from_file import open_checkpoint

    family = open_checkpoint(path)[2]
    refuse_unsupported(family, path.name)
    return f"base model: {path.name}, a single-file {family.label} checkpoint"


def check_clip_skip(name: str, skip: int) -> None:
    """clip_skip against the text encoder's depth, read from its config alone, before anything is cached."""
    from transformers import CLIPTextConfig

    from lorasmith.train.config import ConfigError

    path = Path(name).expanduser()
    if path.is_file():
        from lorasmith.train.from_file import open_checkpoint
        from lorasmith.train.single_file import text_configs

        _, shapes, family = open_checkpoint(path)
        config = CLIPTextConfig(**text_configs(shapes, family)[0])
    else:
        config = load_model(name, functools.partial(CLIPTextConfig.from_pretrained, subfolder="text_encoder"),
                            "base model (text_encoder)")
    if skip > config.num_hidden_layers:
        raise ConfigError(f"training.clip_skip = {skip} is more than the {config.num_hidden_layers} layers of this "
                          "model's text encoder: use 1 (realistic models) or 2 (anime models)")
