"""SDXL base: two text encoders, the UNet's size/crop conditioning, the original (SGM) block names in LoRA keys.

Conventions are Kohya's `sdxl_train_network.py` and diffusers' SDXL pipeline: the context is both encoders'
penultimate hidden states side by side (CLIP-L 768 + OpenCLIP-bigG 1280 wide), the pooled input is bigG's
projected end-of-text embedding, and the time ids are (original h, w, crop top, left, target h, w). The VAE runs
in fp32: SDXL's VAE overflows in fp16 (NaN pictures and latents).
"""

from __future__ import annotations

from lorasmith.models.family import ModelFamily


class SDXL(ModelFamily):
    name, label = "sdxl", "SDXL"
    text_parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    text_prefixes = ("lora_te1", "lora_te2")
    vae_fp32 = True

    def encode(self, tokenizers, encoders, captions, clip_skip):
        import torch

        from lorasmith.models.text import tokenize

        states, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders):
            ids = tokenize(tokenizer, captions).to(next(encoder.parameters()).device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # penultimate, without the final norm: what SDXL was trained on
            pooled = getattr(out, "text_embeds", None)
        return {"context": torch.cat(states, dim=-1), "pooled": pooled}

    def layers_used(self, index, layers, clip_skip):
        return layers - 1 if index == 0 else layers  # the second's last layer feeds the pooled embedding

    def unet_inputs(self, cond, geometry=None):
        import torch

        if geometry is None:
            raise ValueError("SDXL's UNet needs each picture's size and crop (geometry)")
        pooled = cond["pooled"]
        time_ids = torch.tensor(geometry, dtype=pooled.dtype, device=pooled.device)
        return {"encoder_hidden_states": cond["context"],
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def unet_names(self, unet):
        from lorasmith.models.ldm_names import original_key, unet_modules
        from lorasmith.models.adapters import lora_layers

        table = unet_modules(unet)
        return {path: "lora_unet_" + original_key(path + ".weight", table, "UNet").removesuffix(".weight")
                .replace(".", "_") for path in lora_layers(unet)}

    def architecture(self, prediction_type):
        return "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"

    def render(self, unet, vae, scheduler, positive, negative, prompt, seed, device):
        from lorasmith.models.sampling import generate_xl

        return generate_xl(unet, vae, scheduler, positive, negative, prompt, seed, device)
