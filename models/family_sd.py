"""SD1.x (CLIP-L) and SD2.x (OpenCLIP-H): one text encoder, its hidden states with Kohya's clip skip, diffusers
module paths in the LoRA keys."""

from __future__ import annotations

from lorasmith.models.family import ModelFamily


class SD1(ModelFamily):
    loss_band = (0.08, 0.10)
    """What the SD1.5 LoRA guides call healthy (0.08 ideal)."""

    def encode(self, tokenizers, encoders, captions, clip_skip, max_tokens=75):
        from lorasmith.models.text import encode_long, tokenize

        encoder = encoders[0]
        ids = tokenize(tokenizers[0], captions, max_tokens).to(next(encoder.parameters()).device)
        return {"context": encode_long(encoder, ids, clip_skip)}

    def unet_names(self, unet):
        from lorasmith.models.adapters import lora_layers

        return {path: "lora_unet_" + path.replace(".", "_") for path in lora_layers(unet)}

    def architecture(self, prediction_type):
        return "sd_v1", "stable-diffusion-v1/lora"

    def render(self, unet, vae, scheduler, positive, negative, prompt, seed, device, geometry=None):
        from lorasmith.models.sampling import generate

        return generate(unet, vae, None, scheduler, positive["context"], negative["context"], prompt, seed, device)

    def prompt_states(self, index, encoder, ids, clip_skip):
        """(hidden states [chunks, 77, width], None) of 77-token chunks of ids, with Kohya's clip skip; the
        family has no pooled text input."""
        from lorasmith.models.text import encode_prompts

        return encode_prompts(encoder, ids, clip_skip), None

    def pipeline(self, parts):
        """A diffusers pipeline holding a base model's loaded parts (`base.Components`): LoRA adapters, device
        moves and the image processor go through it."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                       unet=parts.unet, scheduler=parts.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def render_img2img(self, parts, scheduler, positive, negative, prompt, seed, device, init, strength,
                       geometry=None):
        """One picture redrawn from `init` at 0 < `strength` < 1; `parts` is the pipeline's components."""
        from lorasmith.models.sampling import img2img

        return img2img(parts, scheduler, positive["context"], negative["context"], prompt, seed, device, init,
                       strength)


class SD2(SD1):
    name, label = "sd2", "SD2.x"
    loss_band = None  # v-prediction's losses sit on another scale; no band is published for either kind
    public_text = (1024, 23)  # OpenCLIP-H without its last layer, as diffusers ships it

    def architecture(self, prediction_type):
        return ("sd_v2", "stable-diffusion-v2-768-v/lora" if prediction_type == "v_prediction"
                else "stable-diffusion-v2-512/lora")
