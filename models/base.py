"""Loading the base model's parts from a hub id or a local diffusers folder, with one-sentence failures."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasmith.common.hub import load_model

RENAMED = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
"""runwayml's repository was taken down; the maintained copy has the same weights."""


@dataclass
class Components:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    """The denoiser: a UNet, or Flux's transformer."""
    scheduler: Any
    name: str
    family: Any = None
    """single_file.Family of a checkpoint file; None for a diffusers folder or hub id."""
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    """SDXL's second text encoder (OpenCLIP-bigG with projection), Flux's T5-XXL, and its tokenizer."""


@dataclass(frozen=True)
class Declared:
    """What a base model says of its own noise schedule; None where it says nothing (an SD2.x file's prediction
    type follows a rule, not a declaration)."""

    prediction_type: str | None
    zero_terminal_snr: bool | None
    source: str
    """Where it says so, for messages: "its v_pred key", "its scheduler config"."""


def declared_schedule(components: Components) -> Declared:
    """A single file declares by marker keys (`v_pred`, `ztsnr`: ComfyUI's and NoobAI's convention); a diffusers
    folder or hub id by its scheduler config."""
    family = components.family
    if family is not None:
        keys = [k for k, on in (("v_pred", family.marked), ("ztsnr", family.zero_terminal_snr)) if on]
        return Declared(family.prediction_type if family.marked else None, family.zero_terminal_snr or None,
                        f"its {' and '.join(keys)} key{'s' if len(keys) > 1 else ''}" if keys else "")
    config = components.scheduler.config
    return Declared(config.get("prediction_type"), bool(config.get("rescale_betas_zero_snr", False)),
                    "its scheduler config")


def quiet_libraries() -> None:
    """Library chatter that would bury the plan, the progress bar and the summary: transformers' loading bars,
    and bitsandbytes' notice about optional 4-bit CPU kernels that LoRA training never uses."""
    import logging

    from lorasmith.models.blip import quiet_transformers

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    quiet_transformers()


def resolve_name(name: str) -> tuple[str, str | None]:
    """The id to load, and a notice when an old id was mapped to its maintained copy."""
    if name in RENAMED:
        return RENAMED[name], f"{name} was removed from the hub; using its maintained copy {RENAMED[name]}"
    return name, None


def load_components(name: str, parts: tuple[str, ...] = ("tokenizer", "text_encoder", "vae", "unet", "scheduler"),
                    families: tuple[str, ...] = ("sd1", "sd2"), companions: dict | None = None) -> Components:
    """Each part from its subfolder (or from one checkpoint file), loaded once; parts not asked for stay None
    (and out of memory). `companions`: the files a Flux.1 transformer file needs beside it (`clip_l`, `t5xxl`,
    `ae`, `t5_tokenizer`, as the preset's model section names them)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    quiet_libraries()
    if bfl_shapes(name) is not None:
        return _flux_from_files(Path(name).expanduser(), parts, companions or {})
    if Path(name).expanduser().is_file():
        return _from_file(Path(name).expanduser(), name, parts, families)
    if is_flux(name):
        if "flux" not in families:
            from lorasmith.models.single_file import CheckpointError

            raise CheckpointError(f"{name} is a Flux.1 model; this command runs SD1.x, SD2.x and SDXL models so far")
        return _flux_components(name, parts)
    if "sdxl" not in families and (Path(name).expanduser() / "text_encoder_2").is_dir():
        from lorasmith.models.single_file import CheckpointError

        raise CheckpointError(f"{name} is an SDXL model (it has text_encoder_2); lora runs SD1.x and SD2.x models "
                              "so far: pass one of those")
    classes = {"tokenizer": CLIPTokenizer, "text_encoder": CLIPTextModel, "vae": AutoencoderKL,
               "unet": UNet2DConditionModel, "scheduler": DDPMScheduler, "tokenizer_2": CLIPTokenizer,
               "text_encoder_2": CLIPTextModelWithProjection}
    return _load_parts(name, parts, classes)


def _load_parts(name: str, parts: tuple[str, ...], classes: dict, folders: dict | None = None) -> Components:
    loaded = {}
    for part in classes:
        if part in parts:
            folder = (folders or {}).get(part, part)
            loader = functools.partial(classes[part].from_pretrained, subfolder=folder)
            loaded[part] = load_model(name, loader, f"base model ({part})")
        else:
            loaded[part] = None
    return Components(name=name, **loaded)


def is_flux(name: str) -> bool:
    """A Flux.1 diffusers folder or hub id: it has a `transformer` and a T5 `text_encoder_2`."""
    path = Path(name).expanduser()
    if path.is_dir():
        return (path / "transformer").is_dir()
    if path.exists() or name.count("/") != 1 or "flux" not in name.lower():
        return False  # only hub ids that say so are asked, so an offline SD run never waits on the hub
    from diffusers import DiffusionPipeline

    return "Flux" in str(load_model(name, DiffusionPipeline.load_config, "base model").get("_class_name", ""))


def configure_family(family, name: str) -> None:
    """Tell a transformer family what its denoiser's config says (Flux: dev or schnell) before anything loads:
    the text length of cached captions depends on it."""
    if family.denoiser == "unet":
        return
    if (shapes := bfl_shapes(name)) is not None:
        from lorasmith.models.flux_file import transformer_config

        family.configure(transformer_config(shapes))
    else:
        from diffusers import FluxTransformer2DModel

        loader = functools.partial(FluxTransformer2DModel.load_config, subfolder=family.denoiser)
        family.configure(load_model(name, loader, f"base model ({family.denoiser})"))


def check_companions(name: str, companions: dict) -> None:
    """Before anything loads: a Flux.1 transformer file needs its CLIP-L, T5-XXL and VAE files named, all of
    them (CheckpointError listing the missing keys); nothing for any other base."""
    if bfl_shapes(name) is None:
        return
    from lorasmith.models.single_file import CheckpointError

    missing = [f"model.{key}" for key in ("clip_l", "t5xxl", "ae") if not companions.get(key)]
    if missing:
        raise CheckpointError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} empty: a Flux.1 "
                              "transformer file holds no text encoders or VAE; set model.clip_l, model.t5xxl and "
                              "model.ae to its CLIP-L, T5-XXL and VAE files (ComfyUI's clip_l.safetensors, "
                              "t5xxl_fp16.safetensors, ae.safetensors), or pass a diffusers folder")


def bfl_shapes(name: str) -> dict | None:
    """The tensor shapes of a Flux.1 transformer file in BFL's layout; None for anything else."""
    path = Path(name).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".safetensors"):
        return None
    from lorasmith.models.flux_file import is_bfl_transformer
    from lorasmith.models.from_file import SafetensorsFile

    shapes = {k: tuple(v.shape) for k, v in SafetensorsFile(path).shapes().items()}
    return shapes if is_bfl_transformer(shapes) else None


def _flux_from_files(path: Path, parts: tuple[str, ...], companions: dict) -> Components:
    from lorasmith.models import flux_parts
    from lorasmith.models.flux_file import load_transformer, transformer_config
    from lorasmith.models.from_file import SafetensorsFile
    from lorasmith.models.tokenizer import clip_tokenizer

    def transformer():
        tensors = SafetensorsFile(path)
        return load_transformer(tensors, {k: tuple(v.shape) for k, v in tensors.shapes().items()}, path.name)

    loaders = {"tokenizer": clip_tokenizer, "text_encoder": lambda: flux_parts.load_clip_l(companions.get("clip_l")),
               "tokenizer_2": lambda: flux_parts.load_t5_tokenizer(companions.get("t5_tokenizer")),
               "text_encoder_2": lambda: flux_parts.load_t5(companions.get("t5xxl")),
               "vae": lambda: flux_parts.load_ae(companions.get("ae")), "unet": transformer,
               "scheduler": lambda: flux_parts.scheduler_for(transformer_config(bfl_shapes(str(path)))["guidance_embeds"])}
    return Components(name=str(path), **{part: loaders[part]() if part in parts else None for part in loaders})


def _flux_components(name: str, parts: tuple[str, ...]) -> Components:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    classes = {"tokenizer": CLIPTokenizer, "text_encoder": CLIPTextModel, "vae": AutoencoderKL,
               "unet": FluxTransformer2DModel, "scheduler": FlowMatchEulerDiscreteScheduler,
               "tokenizer_2": T5TokenizerFast, "text_encoder_2": T5EncoderModel}
    return _load_parts(name, parts, classes, {"unet": "transformer"})


def _from_file(path: Path, name: str, parts: tuple[str, ...], families: tuple[str, ...]) -> Components:
    from lorasmith.models import from_file

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
    from lorasmith.models.single_file import CheckpointError

    if family.name not in families:
        raise CheckpointError(f"{file_name} is an {family.label} checkpoint; lora runs SD1.x and SD2.x "
                              "models so far: pass one of those")


def describe_base(name: str, families: tuple[str, ...] = ("sd1", "sd2")) -> str | None:
    """The plan's line for a local base model: its family, read from tensor names and shapes or configs alone (no
    weights load); None for a hub id. Raises CheckpointError for a file that is no base model."""
    path = Path(name).expanduser()
    if path.is_dir():
        from lorasmith.models.families import family_named

        return f"base model: {path.name}, a diffusers {family_named(inspect_base(name)[0]).label} folder"
    if bfl_shapes(name) is not None:
        return f"base model: {path.name}, a Flux.1 transformer file (BFL's layout)"
    if not path.is_file():
        return None
    from lorasmith.models.from_file import open_checkpoint

    family = open_checkpoint(path)[2]
    refuse_unsupported(family, path.name, families)
    return f"base model: {path.name}, a single-file {family.label} checkpoint"


def inspect_base(name: str) -> tuple[str, Any]:
    """(family name, first text encoder's CLIPTextConfig) from configs or tensor shapes alone, before any weight
    loads: sdxl when there is a second text encoder, sd2 for an OpenCLIP-H encoder, else sd1."""
    from transformers import CLIPTextConfig

    from lorasmith.models.family import is_v2

    path = Path(name).expanduser()
    if bfl_shapes(name) is not None:  # the transformer alone; its CLIP-L is the public one
        return "flux", CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, hidden_act="quick_gelu")
    if path.is_file():
        from lorasmith.models.from_file import open_checkpoint
        from lorasmith.models.single_file import text_configs

        _, shapes, family = open_checkpoint(path)
        return family.name, CLIPTextConfig(**text_configs(shapes, family)[0])
    if is_flux(name):
        return "flux", load_model(name, functools.partial(CLIPTextConfig.from_pretrained, subfolder="text_encoder"),
                                  "base model (text_encoder)")
    if path.is_dir():
        xl = (path / "text_encoder_2").is_dir()
    else:
        from diffusers import DiffusionPipeline

        xl = "text_encoder_2" in load_model(name, DiffusionPipeline.load_config, "base model")
    config = load_model(name, functools.partial(CLIPTextConfig.from_pretrained, subfolder="text_encoder"),
                        "base model (text_encoder)")
    return ("sdxl" if xl else "sd2" if is_v2(config) else "sd1"), config
