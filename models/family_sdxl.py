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
    size_conditioned = True
    zero_empty_negative = True
    """An empty negative prompt is zeros, context and pooled alike: A1111's force_zero_negative_prompt, diffusers'
    force_zeros_for_empty_prompt (what SDXL base was tuned with)."""
    clip_skip_note = "SDXL already takes the penultimate layer of both text encoders"

    def encode(self, tokenizers, encoders, captions, clip_skip, max_tokens=75):
        import torch

        from lorasmith.models.text import join_chunks, tokenize

        states, pooled = [], None
        for index, (tokenizer, encoder) in enumerate(zip(tokenizers, encoders)):
            ids = tokenize(tokenizer, captions, max_tokens).to(next(encoder.parameters()).device)
            chunks = ids.shape[1] if ids.dim() == 3 else 1
            hidden, embeds = self.prompt_states(index, encoder, ids.reshape(-1, ids.shape[-1]), clip_skip)
            states.append(join_chunks(hidden, chunks))
            # the first chunk's pooled embedding, as sd-scripts, A1111 and ComfyUI take it
            pooled = None if embeds is None else embeds[::chunks]
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

    def render(self, unet, vae, scheduler, positive, negative, prompt, seed, device, geometry=None):
        from lorasmith.models.sampling import generate_xl

        return generate_xl(unet, vae, scheduler, positive, negative, prompt, seed, device, geometry)

    def prompt_states(self, index, encoder, ids, clip_skip):
        """(hidden states [chunks, 77, width], pooled [chunks, projection] or None) of 77-token chunks of ids:
        the penultimate layer without the final norm, as `encode` trains on; bigG (index 1) also gives its
        projected end-of-text embedding, CLIP-L none."""
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], getattr(out, "text_embeds", None)

    def pipeline(self, parts):
        """A StableDiffusionXLPipeline holding the loaded parts (both encoders, so LoRA adapters reach
        `lora_te2` too); no watermarker, which would change the pixels."""
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=parts.vae, text_encoder=parts.text_encoder,
                                         text_encoder_2=parts.text_encoder_2, tokenizer=parts.tokenizer,
                                         tokenizer_2=parts.tokenizer_2, unet=parts.unet, scheduler=parts.scheduler,
                                         add_watermarker=False)

    def render_img2img(self, parts, scheduler, positive, negative, prompt, seed, device, init, strength,
                       geometry=None):
        from lorasmith.models.sampling import generate_xl_img2img

        return generate_xl_img2img(parts["unet"], parts["vae"], scheduler, positive, negative, prompt, seed, device,
                                   init, strength, geometry)
