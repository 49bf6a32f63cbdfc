"""The original (LDM/SGM) names of a diffusers UNet's modules: `input_blocks.4.1` for `down_blocks.1.attentions.0`.

Checkpoint files and Kohya's SDXL LoRA keys use these names. The table is laid out from the model's own blocks
(the inverse of diffusers' `convert_ldm_unet_checkpoint`), so any block count, depth or attention placement maps,
tiny test models included.
"""

from __future__ import annotations

_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
"""The last two exist in SDXL's UNet only: its size/crop and pooled-text embedding."""
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def attentions(block) -> list:
    return [a for a in (getattr(block, "attentions", None) or ()) if a is not None]


def unet_modules(unet) -> dict[str, tuple[str, dict]]:
    """diffusers module path → (original module path, renames inside it), walking the blocks as LDM numbers them:
    `input_blocks`/`output_blocks` count every resnet layer and every resampler, `middle_block` alternates."""
    table = {name: (ldm, {}) for name, ldm in _UNET_FIXED.items()}
    index = 1
    for b, block in enumerate(unet.down_blocks):
        layers = attentions(block)
        for j in range(len(block.resnets)):
            table[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{index}.0", _UNET_RESNET)
            if j < len(layers):
                table[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{index}.1", {})
            index += 1
        if getattr(block, "downsamplers", None):
            table[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", {})
            index += 1
    if unet.mid_block is not None:
        for r in range(len(unet.mid_block.resnets)):
            table[f"mid_block.resnets.{r}"] = (f"middle_block.{2 * r}", _UNET_RESNET)
        for a in range(len(attentions(unet.mid_block))):
            table[f"mid_block.attentions.{a}"] = (f"middle_block.{2 * a + 1}", {})
    index = 0
    for b, block in enumerate(unet.up_blocks):
        layers = attentions(block)
        for j in range(len(block.resnets)):
            table[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{index}.0", _UNET_RESNET)
            if j < len(layers):
                table[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{index}.1", {})
            index += 1
        if getattr(block, "upsamplers", None):
            # the upsampler sits after the last layer's attention, when that layer has one
            slot = 2 if len(layers) >= len(block.resnets) else 1
            table[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{index - 1}.{slot}.conv", {})
    return table


def original_key(key: str, modules: dict[str, tuple[str, dict]], part: str) -> str:
    """The original name of one state-dict key: its longest module prefix in `modules`, then the inner rename.
    Also how LoRA files that use the original names (`lora_unet_input_blocks_…`) find their layers."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        found = modules.get(".".join(parts[:cut]))
        if found is not None:
            ldm, inner = found
            module, param = ".".join(parts[cut:-1]), parts[-1]
            module = inner.get(module, module)
            return ".".join(p for p in (ldm, module, param) if p)
    raise ValueError(f"{part} weight {key!r} has no name in the original layout")
