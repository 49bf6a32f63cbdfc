"""Flux.1 (dev and schnell): a rectified-flow transformer conditioned on T5-XXL's hidden states and CLIP-L's pooled
embedding, with BFL's original block names in LoRA keys.

Conventions are Kohya's `flux_train_network.py`, BFL's reference code and diffusers' FluxPipeline: latents are
packed into 2×2 patches with (0, row, column) position ids, text positions have ids 0, timesteps are σ in [0, 1]
(the transformer scales them by 1000), and dev takes the guidance scale as an input. BFL fuses projections that
diffusers keeps apart (q, k, v; a single block's q, k, v and MLP input), so a file's fused module holds every
diffusers part's LoRA side by side: its down projections stacked, its up projection block-diagonal and its alpha
multiplied by the number of parts, which is exactly ΔW of the fused layer at the trained strength. Loaders take
such a module as one LoRA of the summed rank (Kohya's `split_qkv` files have this shape).
"""

from __future__ import annotations

import re

from lorasmith.models.family import ModelFamily

DOUBLE = {  # diffusers path inside transformer_blocks.<i> → (BFL module, part)
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", 0),
    "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_add_out": ("txt_attn_proj", 0),
    "ff.net.0.proj": ("img_mlp_0", 0), "ff.net.2": ("img_mlp_2", 0),
    "ff_context.net.0.proj": ("txt_mlp_0", 0), "ff_context.net.2": ("txt_mlp_2", 0),
    "norm1.linear": ("img_mod_lin", 0), "norm1_context.linear": ("txt_mod_lin", 0),
}
SINGLE = {  # inside single_transformer_blocks.<i>
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3), "proj_out": ("linear2", 0), "norm.linear": ("modulation_lin", 0),
}
TARGETS = {
    "kohya": r"(?:transformer_blocks\.\d+\.(?:attn\.(?:to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|"
             r"ff(?:_context)?\.net\.(?:0\.proj|2)|norm1(?:_context)?\.linear)|"
             r"single_transformer_blocks\.\d+\.(?:attn\.to_[qkv]|proj_mlp|proj_out|norm\.linear))",
    "attention": r"(?:transformer_blocks\.\d+\.attn\.(?:to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|"
                 r"single_transformer_blocks\.\d+\.attn\.to_[qkv])",
}
"""Kohya's Flux set is every Linear of the double and single blocks (DoubleStreamBlock, SingleStreamBlock): the
attention, MLP and modulation layers; `attention` keeps the attention projections alone."""

FUSED = {module for table in (DOUBLE, SINGLE) for module, part in table.values() if part}
"""BFL modules that fuse several diffusers layers."""
_PATH = re.compile(r"^(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)$")


def kohya_part(path: str) -> tuple[str, int] | None:
    """(Kohya module name, part index) of a diffusers Flux transformer path; None outside the blocks."""
    match = _PATH.match(path)
    if not match:
        return None
    kind, index, rest = match.groups()
    table, block = (SINGLE, "single_blocks") if kind == "single_transformer_blocks" else (DOUBLE, "double_blocks")
    if rest not in table:
        return None
    module, part = table[rest]
    return f"lora_unet_{block}_{index}_{module}", part


def layer_key(path: str) -> str:
    """The name a diffusers layer answers to when a file is bound to a Flux transformer: the Kohya name, with
    `:part` for a part of a fused module. ValueError outside Kohya's blocks."""
    named = kohya_part(path)
    if named is None:
        raise ValueError(f"no Kohya name for Flux module {path!r}")
    name, part = named
    return f"{name}:{part}" if any(name.endswith("_" + module) for module in FUSED) else name


class Flux(ModelFamily):
    name, label = "flux", "Flux.1"
    text_parts = ("text_encoder", "text_encoder_2")
    tokenizer_parts = ("tokenizer", "tokenizer_2")
    text_prefixes = ("lora_te1", "lora_te3")
    """CLIP-L is `lora_te1`, T5-XXL `lora_te3`: the names ComfyUI reads (Kohya's lora_flux)."""
    vae_fp32 = True
    objective = "flow"
    denoiser = "transformer"
    prompt_tokens = 512
    clip_skip_note = "Flux reads T5's last layer and CLIP's pooled embedding"
    public_text = (768, 12)
    guided = True
    """dev takes the guidance scale as an input; schnell (distilled for 1-4 steps) does not. Set from the loaded
    transformer by `configure`."""

    def configure(self, config) -> None:
        self.guided = bool(config.get("guidance_embeds", False))

    def texts_trained(self, network) -> int:
        """With text_encoder_lr, CLIP-L trains (Kohya's default); T5-XXL only with network.train_t5xxl."""
        return 2 if network.train_t5xxl else 1

    def text_length(self, dataset) -> int:
        """T5's token count: the preset's, else BFL's (512 for dev, 256 for schnell)."""
        return dataset.t5xxl_max_token_length or (512 if self.guided else 256)

    def targets(self, target: str) -> str:
        return f"^{TARGETS[target]}$"

    def encode(self, tokenizers, encoders, captions, clip_skip, max_tokens=512):
        """T5's last hidden states over `max_tokens` positions (the context) and CLIP-L's pooled embedding over 77,
        as FluxPipeline encodes prompts."""
        clip, t5 = encoders
        device = next(clip.parameters()).device
        ids = tokenizers[0](captions, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids.to(device)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        t5_ids = tokenizers[1](captions, padding="max_length", max_length=max_tokens, truncation=True,
                               return_tensors="pt").input_ids.to(next(t5.parameters()).device)
        return {"context": t5(t5_ids, output_hidden_states=False)[0], "pooled": pooled}

    def unet_inputs(self, cond, geometry=None):
        return {"encoder_hidden_states": cond["context"], "pooled_projections": cond["pooled"]}

    def predict(self, model, noisy, timesteps, inputs: dict):
        """The velocity in latent layout [b, c, h, w]: `noisy` packed into 2×2 patches with their position ids,
        `timesteps` σ·1000 as training draws them."""
        import torch
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        context = inputs["encoder_hidden_states"]
        text_ids = torch.zeros(context.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = inputs.get("guidance")
        out = model(hidden_states=packed, timestep=timesteps.to(noisy.dtype) / 1000, guidance=guidance,
                    encoder_hidden_states=context, pooled_projections=inputs["pooled_projections"],
                    txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h, w, 1)

    def unet_names(self, unet):
        """Module path → Kohya name, in each fused module's part order (q, k, v, MLP) so export stacks them as
        BFL's weight is laid out."""
        from lorasmith.models.adapters import lora_layers

        named = {path: kohya_part(path) for path in lora_layers(unet)}
        missing = [path for path, name in named.items() if name is None]
        if missing:
            raise ValueError(f"no Kohya name for Flux module {missing[0]!r}")
        return {path: named[path][0] for path in sorted(named, key=lambda p: (named[p][0], named[p][1]))}

    def fused_parts(self, unet) -> dict[str, list[str]]:
        """Kohya name → the diffusers paths whose LoRAs it stacks, in order."""
        groups: dict[str, list[str]] = {}
        for path, name in self.unet_names(unet).items():
            groups.setdefault(name, []).append(path)
        return groups

    def architecture(self, prediction_type):
        return "flux1", "flux-1-dev/lora" if self.guided else "flux-1-schnell/lora"

    def metadata(self, config) -> dict:
        t = config.training
        return {"ss_guidance_scale": t.guidance_scale, "ss_timestep_sampling": t.timestep_sampling,
                "ss_sigmoid_scale": t.sigmoid_scale, "ss_discrete_flow_shift": t.discrete_flow_shift,
                "ss_model_prediction_type": "raw", "ss_apply_t5_attn_mask": "False",
                "ss_t5xxl_max_token_length": self.text_length(config.dataset), "ss_model_type": "flux",
                "ss_network_module": "networks.lora_flux"}

    def sampler(self, name, base_config):
        """Flux is drawn with its own flow-matching Euler sampler, whatever `sample_sampler` names."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(base_config)

    def prompt_states(self, index, encoder, ids, clip_skip):
        out = encoder(ids, output_hidden_states=False)
        return (out[0], None) if index == 1 else (None, out.pooler_output)

    def pipeline(self, parts):
        from diffusers import FluxPipeline

        return FluxPipeline(scheduler=parts.scheduler, vae=parts.vae, text_encoder=parts.text_encoder,
                            tokenizer=parts.tokenizer, text_encoder_2=parts.text_encoder_2,
                            tokenizer_2=parts.tokenizer_2, transformer=parts.unet)

    def render(self, unet, vae, scheduler, positive, negative, prompt, seed, device, geometry=None):
        """One picture through FluxPipeline from cached conditioning: dev at the prompt's scale as guidance
        (no negative prompt, no CFG), schnell unguided."""
        from lorasmith.models.sampling_flux import generate_flux

        return generate_flux(unet, vae, scheduler, positive, prompt, seed, device, self.guided)

    def render_img2img(self, parts, scheduler, positive, negative, prompt, seed, device, init, strength,
                       geometry=None):
        from lorasmith.models.sampling_flux import flux_img2img

        return flux_img2img(parts, scheduler, positive, prompt, seed, device, init, strength, self.guided)
