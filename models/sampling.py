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


GUIDANCE_RESCALE = 0.7
"""φ for zero-terminal-SNR bases: CFG's result rescaled towards the conditional prediction's spread, which keeps
pictures from washing out ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Lin et al., §3.4;
ComfyUI's RescaleCFG default)."""


def zero_terminal_snr(config) -> bool:
    """Whether a noise schedule (a scheduler's config) is rescaled to zero SNR at its last step (NoobAI-v and
    other bases trained that way), which changes how it must be sampled."""
    return bool(config.get("rescale_betas_zero_snr", False))


def _rescales(key: str) -> bool:
    import inspect

    import diffusers

    return "rescale_betas_zero_snr" in inspect.signature(getattr(diffusers, SAMPLERS[key][0]).__init__).parameters


def sampler_problem(name: str, base_config) -> str:
    """'' when sampler `name` can sample a base with this noise schedule; else the sentence that says why not.
    For checking samplers before a run (the samplers of train-lora's preview prompts, say)."""
    key = ALIASES.get(name, name)
    if key not in SAMPLERS:
        return f"unknown sampler {name!r}; one of {', '.join([*SAMPLERS, *ALIASES])}"
    if zero_terminal_snr(base_config) and not _rescales(key):
        return (f"sampler {name!r} cannot sample this zero-terminal-SNR base (its schedule has no zero-SNR "
                f"rescaling): choose one of {', '.join(k for k in SAMPLERS if _rescales(k))}")
    return ""


def make_scheduler(name: str, base_config):
    """The named sampler configured like the model's own noise schedule (betas, prediction type).

    A zero-terminal-SNR base also needs its betas rescaled in the sampler and "trailing" timesteps, so that the
    first step starts from pure noise at t = 999 (Lin et al. §3.3); a sampler that cannot rescale is refused
    (ValueError, `sampler_problem`'s sentence) rather than run on the wrong schedule.
    """
    import diffusers

    problem = sampler_problem(name, base_config)
    if problem:
        raise ValueError(problem)
    cls_name, extra = SAMPLERS[ALIASES.get(name, name)]
    if zero_terminal_snr(base_config):
        extra = {**extra, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    return getattr(diffusers, cls_name).from_config(base_config, **extra)


def guidance_rescale(scheduler) -> float:
    """The pipelines' `guidance_rescale` for a sampler made by `make_scheduler`: GUIDANCE_RESCALE on a
    zero-terminal-SNR schedule, else 0 (plain CFG, as before)."""
    return GUIDANCE_RESCALE if zero_terminal_snr(scheduler.config) else 0.0


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
                guidance_scale=prompt.scale, guidance_rescale=guidance_rescale(scheduler),
                latents=latents.to(device, dtype), output_type="np").images
    return finite_picture(pipe, images)


def img2img(parts: dict, scheduler, positive, negative, prompt: Prompt, seed: int, device, init, strength: float):
    """One SD1.x/SD2.x picture redrawn from `init` at `strength` (0 < strength < 1), at the prompt's size.
    diffusers' img2img pipeline takes no `guidance_rescale`, so a zero-terminal-SNR base gets plain CFG here."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**{**parts, "scheduler": scheduler, "text_encoder": None})
    pipe.set_progress_bar_config(disable=True)
    dtype = positive.dtype
    generator = torch.Generator("cpu").manual_seed(seed)
    images = pipe(prompt_embeds=positive.to(device, dtype), negative_prompt_embeds=negative.to(device, dtype),
                  image=init.resize((prompt.width, prompt.height)), strength=strength, generator=generator,
                  num_inference_steps=prompt.steps, guidance_scale=prompt.scale, output_type="np").images
    return finite_picture(pipe, images)


def size_conditioning(prompt: Prompt, geometry=None) -> dict:
    """SDXL's size and crop conditioning as the pipelines take it. `geometry` is (original h, w, crop top,
    left, target h, w); None means the picture's own size, uncropped, as A1111 conditions by default."""
    oh, ow, top, left, th, tw = geometry or (prompt.height, prompt.width, 0, 0, prompt.height, prompt.width)
    return {"original_size": (oh, ow), "crops_coords_top_left": (top, left), "target_size": (th, tw)}


def _xl_embeddings(positive: dict, negative: dict, device) -> dict:
    dtype = positive["context"].dtype
    return {"prompt_embeds": positive["context"].to(device, dtype),
            "negative_prompt_embeds": negative["context"].to(device, dtype),
            "pooled_prompt_embeds": positive["pooled"].to(device, dtype),
            "negative_pooled_prompt_embeds": negative["pooled"].to(device, dtype)}


def _decode_xl(pipe, vae, latents, device):
    """Latents to a PIL picture with the VAE outside autocast, in its own (fp32) precision; NonFinitePicture
    rather than a black square."""
    import torch

    with torch.autocast(torch.device(device).type, enabled=False):
        decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return finite_picture(pipe, pipe.image_processor.postprocess(decoded.float(), output_type="np"))


def generate_xl(unet, vae, scheduler, positive: dict, negative: dict, prompt: Prompt, seed: int, device,
                geometry=None):
    """One SDXL picture from context and pooled embeddings; the size conditioning is `geometry`, by default the
    picture's own size (uncropped). The VAE decodes outside autocast, in its own (fp32) precision."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    latents, generator = _start(unet, pipe.vae_scale_factor, prompt, seed)
    out = pipe(**_xl_embeddings(positive, negative, device), **size_conditioning(prompt, geometry),
               height=prompt.height, width=prompt.width, num_inference_steps=prompt.steps, generator=generator,
               guidance_scale=prompt.scale, guidance_rescale=guidance_rescale(scheduler),
               latents=latents.to(device, positive["context"].dtype), output_type="latent").images
    return _decode_xl(pipe, vae, out, device)


def generate_xl_img2img(unet, vae, scheduler, positive: dict, negative: dict, prompt: Prompt, seed: int, device,
                        init, strength: float, geometry=None):
    """One SDXL picture redrawn from `init` at `strength` (0 < strength < 1). The picture is encoded here, in the
    VAE's fp32 and outside autocast (diffusers' img2img would move the VAE to the UNet's fp16 afterwards); the
    latent is sampled from the seed's generator before the noise, as diffusers does. No aesthetic score: the
    base UNet takes none (`requires_aesthetics_score=False`), only the refiner does."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                            tokenizer_2=None, unet=unet, scheduler=scheduler,
                                            requires_aesthetics_score=False, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    pixels = pipe.image_processor.preprocess(init.resize((prompt.width, prompt.height)))
    with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
        latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.sample(generator) * vae.config.scaling_factor
    out = pipe(**_xl_embeddings(positive, negative, device), **size_conditioning(prompt, geometry),
               image=latents.to(device, positive["context"].dtype), strength=strength, generator=generator,
               num_inference_steps=prompt.steps, guidance_scale=prompt.scale,
               guidance_rescale=guidance_rescale(scheduler), output_type="latent").images
    return _decode_xl(pipe, vae, out, device)


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
