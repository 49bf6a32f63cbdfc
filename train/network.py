"""LoRA adapters through peft: which layers get one, and the list of what trains.

peft's wrapper keeps `base_layer`, starts B at zero (training starts from the base model exactly) and
computes scaling = alpha / r in one place; we only choose the targets.
"""

from __future__ import annotations

UNET_TARGETS = {
    "kohya": r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)"
             r"|ff\.net\.(0\.proj|2)))",
    "attention": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)",
}
"""Kohya's networks/lora.py adapts every Linear and 1×1 convolution inside the UNet's transformer blocks
(Transformer2DModel); `attention` keeps the cross- and self-attention projections alone."""
UNET_CONV_TARGETS = {
    "kohya": r".*(resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)|(downsamplers|upsamplers)\.0\.conv)",
    "attention": r".*resnets\.\d+\.(conv1|conv2)",
}
"""With conv_dim (LoCon): Kohya adapts every Linear and convolution of the ResNet blocks, down- and
upsamplers, at conv_dim for the 3×3 kernels and network_dim for the rest."""
CONV_3X3 = r"resnets\.\d+\.conv[12]|(downsamplers|upsamplers)\.0\.conv"
TEXT_TARGETS = r".*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
"""The text encoders' attention and MLP layers (CLIPAttention, CLIPMLP), as Kohya's."""


def unet_targets(target: str = "kohya", conv: bool = False) -> str:
    """peft's target_modules regex for the UNet: the module set, plus the convolution set for LoCon."""
    return f"^(?:{UNET_TARGETS[target]}" + (f"|{UNET_CONV_TARGETS[target]}" if conv else "") + ")$"


def add_unet_lora(unet, dim: int, alpha: float, dropout: float = 0.0, conv_dim: int = 0, conv_alpha: float = 1.0,
                  target: str = "kohya"):
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=dim, lora_alpha=alpha, lora_dropout=dropout, target_modules=unet_targets(target, bool(conv_dim)),
                        rank_pattern={CONV_3X3: conv_dim} if conv_dim else {},
                        alpha_pattern={CONV_3X3: conv_alpha} if conv_dim else {}, init_lora_weights=True)
    return inject_adapter_in_model(config, unet)


def add_text_lora(text_encoder, dim: int, alpha: float, dropout: float = 0.0, layers: int | None = None):
    """Adapters on the first `layers` encoder layers (all when None): layers after the one whose output is used
    (clip skip, SDXL's penultimate layer) would never receive a gradient, and would be saved as untrained."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = TEXT_TARGETS
    if layers is not None:
        targets = targets.replace(r"layers\.\d+\.", rf"layers\.(?:{'|'.join(map(str, range(layers)))})\.")
    config = LoraConfig(r=dim, lora_alpha=alpha, lora_dropout=dropout, target_modules=f"^(?:{targets})$",
                        init_lora_weights=True)
    return inject_adapter_in_model(config, text_encoder)


def lora_parameters(model) -> list:
    """The adapter weights of `model`, as a list: an iterator handed to the optimizer would be empty by the
    time gradient clipping reads it (the bug in diffusers' example script)."""
    return [p for name, p in model.named_parameters() if "lora_" in name]


def freeze_base(model) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def lora_layers(model) -> dict[str, object]:
    """Module path → peft LoRA layer, for export and tests."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
