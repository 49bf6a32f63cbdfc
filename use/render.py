"""Drawing with a base model and any mix of LoRAs: diffusers' pipelines, prompt embeddings of our own.

Embeddings come from `use.weights` (A1111 emphasis, prompts past 77 tokens, Kohya's clip skip; on SDXL for
each text encoder on its own), so a prompt pasted from A1111 means here what it meant there. The base's family
(`models/family_*.py`) says which encoders, which pipeline and which size conditioning. Noise is drawn on the
CPU from the seed, so a seed gives the same picture start on any device, and the weight-0 cell of a sweep is the
base model exactly.
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


def load_base(model: str, family: str | None = None):
    """(family name, loaded parts) of a base model of any family lorasmith knows: each family's tokenizers and
    text encoders, the VAE, UNet and scheduler. The family is read from configs or tensor shapes when not given."""
    from lorasmith.models.base import inspect_base, load_components, resolve_name
    from lorasmith.models.families import FAMILIES, family_named

    name = resolve_name(model)[0]
    family = family or inspect_base(name)[0]
    kind = family_named(family)
    return family, load_components(name, (*kind.tokenizer_parts, *kind.text_parts, "vae", "unet", "scheduler"),
                                   families=FAMILIES)


class Renderer:
    """A base model with its LoRAs loaded once as adapters; each picture chooses which are on, at what weight.

    What differs between base families (which text encoders, how their states become conditioning, which
    pipeline draws, whether the UNet takes size conditioning) comes from the family (`models.families`), so
    nothing here asks which family it runs.
    """

    def __init__(self, model: str, loras: dict[str, Lora], device: str = "cpu", dtype=None, clip_skip: int = 1,
                 family: str | None = None, original_size: tuple[int, int] | None = None,
                 crop: tuple[int, int] | None = None, parts=None, samplers=()):
        """`original_size` (width, height) and `crop` (top, left) are the size conditioning of families that take
        it (default: each picture's own size, uncropped). `parts`: already loaded `base.Components` (a bench's
        in-memory model, with `family` named); default: loaded from `model`. `samplers` are built at once, so
        one this base cannot take (a zero-terminal-SNR base and `heun`) is refused before the first picture."""
        import torch

        from lorasmith.models.families import family_named
        from lorasmith.use.apply import load_adapters

        quiet()
        if parts is None:
            family, parts = load_base(model, family)
        self.family = family_named(family)
        self.pipe = self.family.pipeline(parts)
        self.pipe.set_progress_bar_config(disable=True)
        self.has_adapters = bool(loras)
        if loras:
            load_adapters(self.pipe, loras)
        # Every part in the precision asked for, whatever the files hold (a merged fp16 folder drawn in fp32);
        # the VAE stays fp32 where the family's overflows in half precision (SDXL's).
        self.pipe.to(device, dtype or torch.float32)
        if self.family.vae_fp32:
            self.pipe.vae.to(torch.float32)
        self.tokenizers = [getattr(self.pipe, name) for name in self.family.tokenizer_parts]
        self.encoders = [getattr(self.pipe, name) for name in self.family.text_parts]
        self.device, self.clip_skip, self.base_config = device, clip_skip, parts.scheduler.config
        self.original_size, self.crop = original_size, crop
        self._schedulers: dict[str, object] = {}
        for name in samplers:
            self.scheduler(name)

    def scheduler(self, name: str):
        if name not in self._schedulers:
            self._schedulers[name] = self.family.sampler(name, self.base_config)
        return self._schedulers[name]

    def embeddings(self, prompt: Prompt) -> tuple[dict, dict]:
        """(positive, negative) conditioning of equal length: A1111 emphasis and chunks per text encoder."""
        import torch

        from lorasmith.use.weights import encode_conditioning

        with torch.no_grad():
            if self.family.prompt_tokens:  # T5 reads the whole prompt; no emphasis, no negative prompt
                positive = self.family.encode(self.tokenizers, self.encoders, [prompt.prompt], 1,
                                              self.family.prompt_tokens)
                return positive, positive
            return encode_conditioning(self.family, self.tokenizers, self.encoders, prompt.prompt, prompt.negative,
                                       self.clip_skip)

    def geometry(self, prompt: Prompt) -> tuple[int, ...]:
        """(original h, w, crop top, left, target h, w): the original size and crop asked for, by default the
        picture's own size, uncropped, as A1111 conditions SDXL. Families without size conditioning ignore it."""
        width, height = self.original_size or (prompt.width, prompt.height)
        top, left = self.crop or (0, 0)
        return height, width, top, left, prompt.height, prompt.width

    def draw(self, prompt: Prompt, seed: int, weights: dict[str, float], sampler: str, init=None,
             strength: float = 1.0):
        """One picture. With `init`: image-to-image at `strength`; 0 gives the picture back through the VAE,
        1 ignores it (the text-to-image picture of the same seed)."""
        import torch

        from lorasmith.use.apply import activate

        if self.has_adapters:
            activate(self.pipe, weights)
        scheduler = self.scheduler(prompt.sampler or sampler)
        with torch.no_grad():
            if init is not None and strength <= 0:
                return self.round_trip(init)
            positive, negative = self.embeddings(prompt)
            if init is None or strength >= 1:
                return self.family.render(getattr(self.pipe, self.family.denoiser), self.pipe.vae, scheduler,
                                          positive, negative, prompt, seed, self.device, self.geometry(prompt))
            return self.family.render_img2img(self.pipe.components, scheduler, positive, negative, prompt, seed,
                                              self.device, init, strength, self.geometry(prompt))

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
