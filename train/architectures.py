"""A base model's architecture from its configs alone, for --preflight: a diffusers folder's config.json files, a
single file's tensor shapes, a hub id's configs in the local Hugging Face cache, or the public architecture of a
known hub id (the full-size configs of models/tiny.py and models/tiny_flux.py). No weights are read and nothing is
downloaded."""

from __future__ import annotations

import json
from pathlib import Path


class PreflightError(ValueError):
    """Preflight cannot estimate: the message is one sentence saying why and what to do."""


PUBLIC = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd1", "runwayml/stable-diffusion-v1-5": "sd1",
          "CompVis/stable-diffusion-v1-4": "sd1", "stabilityai/stable-diffusion-2-1": "sd2",
          "stabilityai/stable-diffusion-2-1-base": "sd2", "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
          "black-forest-labs/FLUX.1-dev": "flux", "black-forest-labs/FLUX.1-schnell": "flux-schnell"}
"""Hub ids whose architecture is public and known here: preflight needs no download for them."""
SD21 = dict(
    unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
              attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True, sample_size=96),
    text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
              projection_dim=512, vocab_size=49408, hidden_act="gelu"),
)
"""stabilityai/stable-diffusion-2-1's unet and text_encoder configs (the VAE is SD1.5's)."""


def public_arch(family: str):
    """The public base of `family` (sd1, sd2, sdxl, flux; flux-schnell) from the full-size configs."""
    from transformers import CLIPTextConfig

    from lorasmith.models.tiny import SIZES
    from lorasmith.train.footprint import Arch

    if family.startswith("flux"):
        return flux_arch(None, f"the public FLUX.1-{'schnell' if family == 'flux-schnell' else 'dev'} architecture "
                               "(configs only, no weights)", guided=family == "flux")

    spec = SIZES["sdxl" if family == "sdxl" else "sd15"]
    unet, text = (SD21["unet"], SD21["text"]) if family == "sd2" else (spec["unet"], spec["text"])
    texts = [CLIPTextConfig(max_position_embeddings=77, **{"hidden_act": "quick_gelu", **text})]
    if family == "sdxl":
        texts.append(CLIPTextConfig(max_position_embeddings=77, hidden_act="gelu", **spec["text_2"]))
    vae = dict(spec["vae"], in_channels=3, out_channels=3, latent_channels=4)
    label = {"sd1": "SD1.5", "sd2": "SD2.1", "sdxl": "SDXL base 1.0"}[family]
    return Arch(family, dict(unet), texts, vae, f"the public {label} architecture (configs only, no weights)")


def resolve_arch(name: str, family: str | None = None):
    """The architecture of model.pretrained_model from configs alone: a diffusers folder's config.json files, a
    single file's tensor shapes, a hub id's configs in the local Hugging Face cache, the public architecture
    of a known hub id, or of `family` when given. Raises PreflightError when none applies."""
    if family:
        return public_arch(family)
    path = Path(name).expanduser()
    if path.is_dir():
        return _folder_arch(path, path.name)
    if path.is_file():
        return _file_arch(path)
    cached = _hub_cache(name)
    if cached is not None:
        return _folder_arch(cached, f"{name} (configs from the local Hugging Face cache)")
    if name in PUBLIC:
        return public_arch(PUBLIC[name])
    raise PreflightError(f"preflight needs the base model's configs and {name} is neither a local folder or file nor "
                         "in the Hugging Face cache: download its *.json files, pass a local path, or add "
                         "--family sd1|sd2|sdxl|flux to estimate with that family's public architecture")


def flux_arch(transformer: dict | None, source: str, guided: bool = True):
    """A Flux.1 base: its transformer's config (the public one when None) with the CLIP-L, T5-XXL and AE every
    Flux.1 checkpoint shares."""
    from transformers import CLIPTextConfig, T5Config

    from lorasmith.models.tiny_flux import FLUX1
    from lorasmith.train.footprint import Arch

    transformer = transformer or {**FLUX1["transformer"], "guidance_embeds": guided}
    return Arch("flux", dict(transformer), [CLIPTextConfig(**FLUX1["clip"]), T5Config(**FLUX1["t5"])],
                dict(FLUX1["vae"]), source)


def _folder_arch(folder: Path, label: str):
    from transformers import AutoConfig

    from lorasmith.models.base import inspect_base
    from lorasmith.models.families import family_named
    from lorasmith.train.footprint import Arch

    family = family_named(inspect_base(str(folder))[0])
    read = lambda part: json.loads((folder / part / "config.json").read_text(encoding="utf-8"))  # noqa: E731
    texts = [AutoConfig.from_pretrained(folder, subfolder=part) for part in family.text_parts]
    return Arch(family.name, read(family.denoiser), texts, read("vae"), f"{label} (its config.json files)")


def _file_arch(path: Path):
    from transformers import CLIPTextConfig

    from lorasmith.models.base import bfl_shapes
    from lorasmith.models.from_file import open_checkpoint
    from lorasmith.models.single_file import text_configs, unet_config, vae_config
    from lorasmith.train.footprint import Arch

    if (bfl := bfl_shapes(str(path))) is not None:
        from lorasmith.models.flux_file import transformer_config

        return flux_arch(transformer_config(bfl), f"{path.name} (the transformer's config from its tensor shapes; "
                                                  "Flux.1's public CLIP-L, T5-XXL and AE)")
    _, shapes, family = open_checkpoint(path)
    return Arch(family.name, unet_config(shapes), [CLIPTextConfig(**c) for c in text_configs(shapes, family)],
                vae_config(shapes), f"{path.name} (configs from its tensor shapes)")


def _hub_cache(name: str) -> Path | None:
    """The snapshot folder of a hub id whose configs are in the local cache (nothing is downloaded)."""
    if name.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for denoiser in ("unet", "transformer"):
        found = [try_to_load_from_cache(name, f"{part}/config.json") for part in (denoiser, "vae", "text_encoder")]
        if all(isinstance(f, str) for f in found):
            return Path(found[0]).parent.parent
    return None
