"""Flux.1 pictures through diffusers' FluxPipeline from already computed conditioning: dev at the prompt's scale as
its guidance input (Flux has no negative prompt and no CFG), schnell without guidance."""

from __future__ import annotations

from lorasmith.common.prompts import Prompt


def generate_flux(transformer, vae, scheduler, positive: dict, prompt: Prompt, seed: int, device, guided: bool = True):
    """One picture; the seed's noise is drawn on the CPU, so a seed gives the same picture on any device.
    NonFinitePicture rather than a black one."""
    import torch
    from diffusers import FluxPipeline

    from lorasmith.models.sampling import finite_picture

    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    dtype = positive["context"].dtype
    images = pipe(prompt_embeds=positive["context"].to(device, dtype),
                  pooled_prompt_embeds=positive["pooled"].to(device, dtype), height=prompt.height, width=prompt.width,
                  num_inference_steps=prompt.steps, guidance_scale=prompt.scale if guided else 0.0,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return finite_picture(pipe, images)


def flux_img2img(parts: dict, scheduler, positive: dict, prompt: Prompt, seed: int, device, init, strength: float,
                 guided: bool = True):
    """One picture redrawn from `init` at 0 < `strength` < 1, at the prompt's size."""
    import torch
    from diffusers import FluxImg2ImgPipeline

    from lorasmith.models.sampling import finite_picture

    pipe = FluxImg2ImgPipeline(**{**parts, "scheduler": scheduler, "text_encoder": None, "text_encoder_2": None})
    pipe.set_progress_bar_config(disable=True)
    dtype = positive["context"].dtype
    images = pipe(prompt_embeds=positive["context"].to(device, dtype),
                  pooled_prompt_embeds=positive["pooled"].to(device, dtype),
                  image=init.resize((prompt.width, prompt.height)), strength=strength, height=prompt.height,
                  width=prompt.width, num_inference_steps=prompt.steps, guidance_scale=prompt.scale if guided else 0.0,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return finite_picture(pipe, images)
