"""Sample images from the LoRA in training, through diffusers' StableDiffusion(XL)Pipeline, and a grid per event.

The pipeline gets prompt embeddings from train-lora's own clip-skip function (`prompt_embeds=`), so
samples see exactly the conditioning training used. Sampler names are Kohya's `sample_sampler` values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from lorasmith.common.prompts import Prompt

SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}
ALIASES = {"k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a"}
TILE = 256
"""Grid tiles are scaled to this height: enough to judge an epoch, small enough for a report."""


@dataclass
class Sample:
    path: Path
    prompt: Prompt
    seed: int


def make_scheduler(name: str, base_config):
    """The named sampler configured like the model's own noise schedule (betas, prediction type)."""
    import diffusers

    key = ALIASES.get(name, name)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; one of {', '.join([*SAMPLERS, *ALIASES])}")
    cls, extra = SAMPLERS[key]
    return getattr(diffusers, cls).from_config(base_config, **extra)


def _start(unet, scale: int, prompt: Prompt, seed: int):
    """The seed's starting noise and the generator that then feeds ancestral samplers' per-step noise, both on the
    CPU, so the same seed gives the same picture on any device (euler_a included)."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, unet.config.in_channels, prompt.height // scale, prompt.width // scale),
                          generator=generator)
    return latents, generator


class NonFinitePicture(ValueError):
    """A picture whose pixels came out NaN or infinite: saved, it would be a black square that looks drawn."""


def finite_picture(pipe, images):
    """The first of a pipeline's numpy pictures as PIL (the same conversion as `output_type="pil"`), or
    NonFinitePicture when its values are not finite."""
    import numpy as np

    if not np.isfinite(images).all():
        raise NonFinitePicture("the picture came out NaN or infinite (a LoRA or emphasis weight too strong for "
                               "the model, or an fp16 overflow: try lower weights or --precision fp32/bf16)")
    return pipe.numpy_to_pil(images)[0]


def generate(unet, vae, tokenizer, scheduler, positive, negative, prompt: Prompt, seed: int, device):
    """One picture for `prompt` with embeddings already computed; NonFinitePicture rather than a black one."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents, generator = _start(unet, pipe.vae_scale_factor, prompt, seed)  # scale 8 for SD's VAE, less if smaller
    dtype = positive.dtype
    images = pipe(prompt_embeds=positive.to(device, dtype), negative_prompt_embeds=negative.to(device, dtype),
                height=prompt.height, width=prompt.width, num_inference_steps=prompt.steps, generator=generator,
                guidance_scale=prompt.scale, latents=latents.to(device, dtype), output_type="np").images
    return finite_picture(pipe, images)


def generate_xl(unet, vae, scheduler, positive: dict, negative: dict, prompt: Prompt, seed: int, device):
    """One SDXL picture from context and pooled embeddings; the size conditioning is the picture's own size
    (uncropped). The VAE decodes outside autocast, in its own (fp32) precision."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    latents, generator = _start(unet, pipe.vae_scale_factor, prompt, seed)
    dtype = positive["context"].dtype
    out = pipe(prompt_embeds=positive["context"].to(device, dtype),
               negative_prompt_embeds=negative["context"].to(device, dtype),
               pooled_prompt_embeds=positive["pooled"].to(device, dtype),
               negative_pooled_prompt_embeds=negative["pooled"].to(device, dtype),
               height=prompt.height, width=prompt.width, num_inference_steps=prompt.steps, generator=generator,
               guidance_scale=prompt.scale, latents=latents.to(device, dtype), output_type="latent").images
    with torch.autocast(torch.device(device).type, enabled=False):
        decoded = vae.decode(out.to(vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0]


def label_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType
        return ImageFont.load_default()


def fit_text(draw, text: str, width: float, font) -> str:
    """`text`, or as much of it as fits in `width` pixels followed by an ellipsis. No glyph is narrower than a
    pixel, so at most `width` characters are ever measured, and the cut is found by bisection: a 10,000-word
    prompt costs a dozen measurements, not thousands."""
    limit = max(1, int(width))
    if len(text) <= limit and draw.textlength(text, font=font) <= width:
        return text
    low, high = 1, min(len(text), limit)  # the longest fitting prefix lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if draw.textlength(text[:middle] + "…", font=font) <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low] + "…"


def make_grid(images: list[Image.Image], labels: list[str], title: str, tile: int = TILE) -> Image.Image:
    """Tiles side by side at one height, each with its label under it, a title above."""
    font, pad, line = label_font(13), 6, 16
    tiles = [im.resize((max(1, round(im.width * tile / im.height)), tile), Image.Resampling.LANCZOS) for im in images]
    width = sum(t.width for t in tiles) + pad * (len(tiles) + 1)
    grid = Image.new("RGB", (max(width, 200), tile + 3 * line + 3 * pad), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((pad, pad), title, fill="black", font=font)
    x = pad
    for t, label in zip(tiles, labels):
        grid.paste(t, (x, line + 2 * pad))
        draw.text((x, tile + line + 3 * pad), fit_text(draw, label, t.width, font), fill="black", font=font)
        x += t.width + pad
    return grid
