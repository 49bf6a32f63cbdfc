"""What differs between base-model families, behind one small interface.

A family says which text parts to load, how captions become the UNet's conditioning (and what else the UNet
takes), how a LoRA file names the adapted modules, what the file's metadata calls the base, and how a sample is
drawn. The trainer, sampling, validation and export call these and never ask which family they run.
"""

from __future__ import annotations


class ModelFamily:
    name = "sd1"
    label = "SD1.x"
    text_parts: tuple[str, ...] = ("text_encoder",)
    """Component names of the text encoders, in the order `encode` takes them."""
    tokenizer_parts: tuple[str, ...] = ("tokenizer",)
    text_prefixes: tuple[str, ...] = ("lora_te",)
    """Kohya's key prefix per text encoder."""
    vae_fp32 = False
    """Run the VAE in fp32 whatever the training precision."""
    loss_band: tuple[float, float] | None = None
    """The mean loss per epoch that the family's LoRA guides call healthy; None where none is published, since
    another family's band would mark good epochs bad."""
    public_text: tuple[int, int] = (768, 12)
    """(width, layers) of the first text encoder in the family's public bases."""
    objective = "diffusion"
    """What training fits: "diffusion" (ε or v at discrete timesteps) or "flow" (rectified flow's velocity)."""
    denoiser = "unet"
    """The denoiser's subfolder in a diffusers folder (the `unet` part of `base.Components`)."""
    prompt_tokens = 0
    """`lora generate` encodes a prompt whole to this many tokens with `encode` (Flux's T5: 512), instead of
    A1111's weighted 77-token chunks (0)."""
    def texts_trained(self, network) -> int | None:
        """How many of the text encoders take adapters when the text encoders train, for a preset's network
        section; None: all."""
        return None

    # What `lora generate` asks of a family.
    size_conditioned = False
    """The UNet takes size and crop conditioning (`--original-size`, `--crop-top-left`)."""
    zero_empty_negative = False
    """An empty negative prompt becomes zeros (SDXL, as A1111 and diffusers do) rather than being encoded."""
    clip_skip_note: str | None = None
    """Why `--clip-skip` does not apply to the family; None where it does."""

    def healthy_band(self, text_config) -> tuple[float, float] | None:
        """`loss_band` for a public base; None for a custom one (the toy, tiny test models), whose losses the
        published band says nothing about."""
        shape = (text_config.hidden_size, text_config.num_hidden_layers)
        return self.loss_band if shape == self.public_text else None

    def encode(self, tokenizers, encoders, captions: list[str], clip_skip: int, max_tokens: int = 75) -> dict:
        """Batched conditioning tensors by name: at least `context` (the cross-attention input). `max_tokens`
        above 75 reads longer captions in chunks (Kohya's max_token_length)."""
        raise NotImplementedError

    def configure(self, denoiser) -> None:
        """Learn what the loaded denoiser says of the base (Flux: dev or schnell); nothing for SD."""

    def text_length(self, dataset) -> int:
        """The token count captions are encoded to, from the preset's dataset section."""
        return dataset.max_token_length

    def targets(self, target: str) -> str | None:
        """peft's target_modules regex for a transformer denoiser's `target` set; None for a UNet, whose sets
        (with LoCon's convolutions and block plans) train/network.py keeps."""
        return None

    def predict(self, model, noisy, timesteps, inputs: dict):
        """The denoiser's output for noisy latents [b, c, h, w], in the same layout."""
        return model(noisy, timesteps, **inputs).sample

    def fused_parts(self, unet) -> dict[str, list[str]]:
        """Kohya name → the module paths whose LoRAs one file module holds (one path each, except where the
        original layout fuses layers the diffusers model keeps apart)."""
        return {name: [path] for path, name in self.unet_names(unet).items()}

    def metadata(self, config) -> dict:
        """The family's own `ss_*` keys."""
        return {}

    def sampler(self, name: str, base_config):
        """The scheduler a sample is drawn with: the named Kohya sampler configured like the base."""
        from lorasmith.models.sampling import make_scheduler

        return make_scheduler(name, base_config)

    def layers_used(self, index: int, layers: int, clip_skip: int) -> int:
        """How many of text encoder `index`'s `layers` shape the conditioning (the rest need no adapter)."""
        return layers - (clip_skip - 1)

    def unet_inputs(self, cond: dict, geometry: list[tuple[int, ...]] | None = None) -> dict:
        """Keyword arguments of the UNet's forward for a batch of conditioning; `geometry` is each picture's
        (original h, w, crop top, left, target h, w), which only some families use."""
        return {"encoder_hidden_states": cond["context"]}

    def unet_names(self, unet) -> dict[str, str]:
        """Module path → Kohya's `lora_unet_…` name, for the adapted layers of `unet`."""
        raise NotImplementedError

    def architecture(self, prediction_type: str) -> tuple[str, str]:
        """(ss_base_model_version, modelspec.architecture) as Kohya's sd-scripts write them."""
        raise NotImplementedError

    def render(self, unet, vae, scheduler, positive: dict, negative: dict, prompt, seed: int, device,
               geometry=None):
        """One picture for a prompt from already computed conditioning; `geometry` is the size conditioning of
        families that take it."""
        raise NotImplementedError

    def prompt_states(self, index: int, encoder, ids, clip_skip: int):
        """(hidden states [chunks, 77, width], pooled or None) of text encoder `index` for `lora generate`'s
        77-token chunks."""
        raise NotImplementedError

    def pipeline(self, parts):
        """A diffusers pipeline holding a base model's loaded parts (`base.Components`)."""
        raise NotImplementedError

    def render_img2img(self, parts, scheduler, positive, negative, prompt, seed, device, init, strength,
                       geometry=None):
        """One picture redrawn from `init` at 0 < `strength` < 1."""
        raise NotImplementedError


def is_v2(text_config) -> bool:
    """SD2.x by its text encoder: OpenCLIP-H (1024 wide, gelu) where SD1.x has CLIP-L (768, quick_gelu)."""
    return text_config.hidden_size == 1024 or text_config.hidden_act != "quick_gelu"
