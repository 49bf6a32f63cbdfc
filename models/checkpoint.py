"""Saving a diffusers Stable Diffusion 1.x as one original-layout checkpoint, the file A1111/Forge, ComfyUI and
diffusers' `from_single_file` all read.

Keys follow the original CompVis code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
`cond_stage_model.transformer.text_model.*` (CLIP). The renames invert diffusers' `convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint` and `convert_ldm_clip_checkpoint`, and are laid out from the models' own blocks
rather than from SD1.5's fixed shape, so any block count, depth or attention placement converts.
"""

from __future__ import annotations

from pathlib import Path

from lorasmith.common.files import atomic_writer
from lorasmith.models.ldm_names import attentions, original_key, unet_modules

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

XL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_CONV_WEIGHTS = ("q.weight", "k.weight", "v.weight", "proj_out.weight")
"""The original VAE attention projects with 1×1 convolutions where diffusers uses Linear layers."""
_TEXT_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def vae_modules(vae) -> dict[str, tuple[str, dict]]:
    """diffusers module path → (original module path, renames inside it); the original numbers decoder levels
    from the lowest resolution up, so diffusers' up block i is `up.{n-1-i}`."""
    table = {"quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for part in ("encoder", "decoder"):
        coder = getattr(vae, part)
        for name, ldm in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out")):
            table[f"{part}.{name}"] = (f"{part}.{ldm}", {})
        if coder.mid_block is not None:
            for r in range(len(coder.mid_block.resnets)):
                table[f"{part}.mid_block.resnets.{r}"] = (f"{part}.mid.block_{r + 1}", _VAE_RESNET)
            for a in range(len(attentions(coder.mid_block))):
                table[f"{part}.mid_block.attentions.{a}"] = (f"{part}.mid.attn_{a + 1}", _VAE_ATTENTION)
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET)
        if getattr(block, "downsamplers", None):
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
    levels = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = levels - 1 - i
        for j in range(len(block.resnets)):
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        if getattr(block, "upsamplers", None):
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", {})
    return table


_OPEN_CLIP = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPEN_CLIP_PREFIX = "cond_stage_model.model."


def open_clip_state_dict(text_encoder, prefix: str = None) -> dict:
    """SD2.x's text encoder in OpenCLIP's layout (`cond_stage_model.model.*`): the inverse of diffusers'
    `convert_open_clip_checkpoint`, q/k/v joined into `in_proj`. diffusers keeps 23 of OpenCLIP-H's 24 blocks
    (SD2 reads the penultimate one), so the file holds the 23 it has."""
    import torch

    prefix = prefix or OPEN_CLIP_PREFIX
    weights = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()
               if not k.endswith("position_ids")}
    state = {prefix + _OPEN_CLIP[k]: weights.pop(k) for k in list(weights) if k in _OPEN_CLIP}
    if "text_projection.weight" in weights:  # SDXL's bigG: OpenCLIP multiplies by it, Linear by its transpose
        state[prefix + "text_projection"] = weights.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(k.split(".")[2]) for k in weights if k.startswith("encoder.layers.")})
    for i in layers:
        inner, out = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            state[f"{out}attn.in_proj_{kind}"] = torch.cat([weights.pop(f"{inner}self_attn.{p}_proj.{kind}")
                                                            for p in "qkv"])
            for ours, theirs in _OPEN_CLIP_LAYER.items():
                state[f"{out}{theirs}.{kind}"] = weights.pop(f"{inner}{ours}.{kind}")
    if weights:
        raise ValueError(f"text-encoder weight {next(iter(weights))!r} has no name in the SD2.x layout")
    return state


def text_state_dict(text_encoder, prefix: str = TEXT_PREFIX) -> dict:
    """CLIP under `text_model.*` whichever module layout transformers gave it (≥ 5.6 dropped the wrapper);
    SD2.x's OpenCLIP (gelu, not CLIP-L's quick_gelu) in its own layout. `position_ids` is a constant, not a
    weight; no loader needs it from the file."""
    config = text_encoder.config
    if getattr(config, "hidden_act", "quick_gelu") != "quick_gelu":
        return open_clip_state_dict(text_encoder)
    state = {}
    for key, tensor in text_encoder.state_dict().items():
        inner = key.removeprefix("text_model.")
        if inner.endswith("position_ids"):
            continue
        if not inner.startswith(_TEXT_PARTS):
            raise ValueError(f"text-encoder weight {key!r} has no name in the SD1.x layout")
        state[prefix + inner] = tensor
    return state


def _original(model, prefix: str, modules: dict, part: str) -> dict:
    state = {}
    for key, tensor in model.state_dict().items():
        if "lora_" in key or ".base_layer." in key:
            raise ValueError(f"{part} still carries adapter layers ({key!r}); merge and unload them first")
        name = original_key(key, modules, part)
        if part == "VAE" and ".mid.attn_" in name and name.endswith(_VAE_CONV_WEIGHTS) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        state[prefix + name] = tensor
    return state


def vae_state_dict(vae, prefix: str = VAE_PREFIX) -> dict:
    """The VAE's weights under the original (LDM) names; BFL's `ae.safetensors` is this layout with no prefix."""
    return _original(vae, prefix, vae_modules(vae), "VAE")


def original_state_dict(unet, vae, text_encoder, text_encoder_2=None) -> dict:
    """The parts' weights under the original single-file key names (contiguous, CPU, dtype kept). With
    `text_encoder_2`, SDXL's layout: CLIP-L and OpenCLIP-bigG under `conditioner.embedders.0/1`."""
    state = {**_original(unet, UNET_PREFIX, unet_modules(unet), "UNet"), **vae_state_dict(vae)}
    if text_encoder_2 is None:
        state.update(text_state_dict(text_encoder))
    else:
        state.update(text_state_dict(text_encoder, XL_CLIP_PREFIX))
        state.update(open_clip_state_dict(text_encoder_2, XL_OPEN_CLIP_PREFIX))
    return {key: tensor.detach().to("cpu").contiguous() for key, tensor in state.items()}


def save_checkpoint(path: Path, state: dict, metadata: dict[str, str], dtype=None) -> Path:
    """Write under a temporary name, fsync, rename: a multi-GB write that fails leaves no file a UI would list.
    `dtype` casts floating tensors only (fp16 halves the file); integer buffers keep theirs."""
    from safetensors.torch import save

    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    tensors = {k: v.contiguous() for k, v in state.items()}
    with atomic_writer(Path(path), fsync=True) as handle:
        handle.write(save(tensors, {k: str(v) for k, v in metadata.items()}))
    return Path(path)
