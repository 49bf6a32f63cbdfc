"""Drawing with a base model and any mix of LoRAs: diffusers' pipelines, prompt embeddings of our own.

Embeddings come from `use.weights` (A1111 emphasis, prompts past 77 tokens, Kohya's clip skip), so a
prompt pasted from A1111 means here what it meant there. Noise is drawn on the CPU from the seed, so a seed
gives the same picture start on any device, and the weight-0 cell of a sweep is the base model exactly.
"""

from __future__ import annotations

from pathlib import Path

from lorasmith.common.prompts import Prompt
from lorasmith.lorafile.read import Lora


def quiet() -> None:
    """Library notices that would bury the progress bar and summary: transformers' and diffusers' loading chatter,
    peft's note that a second adapter joins the first (intended here)."""
    import warnings

    from diffusers.utils import logging as diffusers_logging

    from lorasmith.models.base import quiet_libraries

    quiet_libraries()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")


def pick_device(device: str, precision: str):
    """(device, dtype): fp16 on CUDA unless told otherwise, fp32 on the CPU (half precision there is slow
    and some CPU kernels lack it)."""
    import torch

    if device == "auto":
        from accelerate import PartialState

        device = str(PartialState().device)
    if precision == "auto":
        precision = "fp16" if device.startswith("cuda") else "fp32"
    return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


class Renderer:
    """A base model with its LoRAs loaded once as adapters; each picture chooses which are on, at what weight."""

    def __init__(self, model: str, loras: dict[str, Lora], device: str = "cpu", dtype=None, clip_skip: int = 1):
        import torch
        from diffusers import StableDiffusionPipeline

        from lorasmith.models.base import load_components, resolve_name
        from lorasmith.use.apply import load_adapters

        quiet()
        parts = load_components(resolve_name(model)[0])
        self.pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                            unet=parts.unet, scheduler=parts.scheduler, safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.has_adapters = bool(loras)
        if loras:
            load_adapters(self.pipe, loras)
        # Every part in the precision asked for, whatever the files hold (a merged fp16 folder drawn in fp32).
        self.pipe.to(device, dtype or torch.float32)
        self.device, self.clip_skip, self.base_config = device, clip_skip, parts.scheduler.config
        self._schedulers: dict[str, object] = {}

    def scheduler(self, name: str):
        from lorasmith.models.sampling import make_scheduler

        if name not in self._schedulers:
            self._schedulers[name] = make_scheduler(name, self.base_config)
        return self._schedulers[name]

    def embeddings(self, prompt: Prompt):
        import torch

        from lorasmith.use.weights import encode_pair

        with torch.no_grad():
            pos, neg = encode_pair(self.pipe.tokenizer, self.pipe.text_encoder, prompt.prompt, prompt.negative,
                                   self.clip_skip)
        return pos, neg

    def draw(self, prompt: Prompt, seed: int, weights: dict[str, float], sampler: str, init=None,
             strength: float = 1.0):
        """One picture. With `init`: image-to-image at `strength`; 0 gives the picture back through the VAE,
        1 ignores it (the text-to-image picture of the same seed)."""
        import torch

        from lorasmith.models.sampling import generate
        from lorasmith.use.apply import activate

        if self.has_adapters:
            activate(self.pipe, weights)
        scheduler = self.scheduler(prompt.sampler or sampler)
        with torch.no_grad():
            if init is not None and strength <= 0:
                return self.round_trip(init)
            positive, negative = self.embeddings(prompt)
            if init is None or strength >= 1:
                return generate(self.pipe.unet, self.pipe.vae, self.pipe.tokenizer, scheduler, positive, negative,
                                prompt, seed, self.device)
            return self._img2img(prompt, seed, scheduler, positive, negative, init, strength)

    def _img2img(self, prompt: Prompt, seed: int, scheduler, positive, negative, init, strength: float):
        import torch
        from diffusers import StableDiffusionImg2ImgPipeline

        from lorasmith.models.sampling import finite_picture

        parts = self.pipe.components
        pipe = StableDiffusionImg2ImgPipeline(**{**parts, "scheduler": scheduler, "text_encoder": None})
        pipe.set_progress_bar_config(disable=True)
        dtype = positive.dtype
        generator = torch.Generator("cpu").manual_seed(seed)
        images = pipe(prompt_embeds=positive.to(self.device, dtype), negative_prompt_embeds=negative.to(self.device, dtype),
                      image=init.resize((prompt.width, prompt.height)), strength=strength, generator=generator,
                      num_inference_steps=prompt.steps, guidance_scale=prompt.scale, output_type="np").images
        return finite_picture(pipe, images)

    def round_trip(self, init):
        """The picture encoded and decoded by the VAE: what strength 0 leaves of it."""
        import torch

        processor = self.pipe.image_processor
        vae = self.pipe.vae
        pixels = processor.preprocess(init).to(self.device, vae.dtype)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mode()
            decoded = vae.decode(latents).sample
        return processor.postprocess(decoded, output_type="pil")[0]


def model_hash(model: str) -> str:
    """A1111's `Model hash` (sha256, 10 digits) of a checkpoint file, or of a diffusers folder's UNet weights;
    empty for a hub id, which A1111 would not know either."""
    from lorasmith.common.files import sha256_file

    path = Path(model)
    if path.is_file():
        return sha256_file(path)[:10]
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (path / "unet" / name).is_file():
            return sha256_file(path / "unet" / name)[:10]
    return ""
