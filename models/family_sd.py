"""SD1.x (CLIP-L) and SD2.x (OpenCLIP-H): one text encoder, its hidden states with Kohya's clip skip, diffusers
module paths in the LoRA keys."""

from __future__ import annotations

from lorasmith.models.family import ModelFamily


class SD1(ModelFamily):
    loss_band = (0.08, 0.10)
    """What the SD1.5 LoRA guides call healthy (0.08 ideal)."""

    def encode(self, tokenizers, encoders, captions, clip_skip):
        from lorasmith.models.text import encode_prompts, tokenize

        encoder = encoders[0]
        ids = tokenize(tokenizers[0], captions).to(next(encoder.parameters()).device)
        return {"context": encode_prompts(encoder, ids, clip_skip)}

    def unet_names(self, unet):
        from lorasmith.models.adapters import lora_layers

        return {path: "lora_unet_" + path.replace(".", "_") for path in lora_layers(unet)}

    def architecture(self, prediction_type):
        return "sd_v1", "stable-diffusion-v1/lora"

    def render(self, unet, vae, scheduler, positive, negative, prompt, seed, device):
        from lorasmith.models.sampling import generate

        return generate(unet, vae, None, scheduler, positive["context"], negative["context"], prompt, seed, device)


class SD2(SD1):
    name, label = "sd2", "SD2.x"
    loss_band = None  # v-prediction's losses sit on another scale; no band is published for either kind
    public_text = (1024, 23)  # OpenCLIP-H without its last layer, as diffusers ships it

    def architecture(self, prediction_type):
        return ("sd_v2", "stable-diffusion-v2-768-v/lora" if prediction_type == "v_prediction"
                else "stable-diffusion-v2-512/lora")
