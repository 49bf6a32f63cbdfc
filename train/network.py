"""LoRA adapters through peft: which layers get one, and the list of what trains.

peft's wrapper keeps `base_layer`, starts B at zero (training starts from the base model exactly) and
computes scaling = alpha / r in one place; we only choose the targets.
"""

from __future__ import annotations

UNET_ATTENTION = r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)"
UNET_CONV = r".*resnets\.\d+\.(conv1|conv2)"
TEXT_TARGETS = r".*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"
"""Kohya's targets: the UNet's attention projections (plus ResNet convolutions for LoCon) and the text
encoder's attention and MLP layers."""


def add_unet_lora(unet, dim: int, alpha: float, dropout: float = 0.0, conv_dim: int = 0, conv_alpha: float = 1.0):
    from peft import LoraConfig, inject_adapter_in_model

    targets = UNET_ATTENTION + (f"|{UNET_CONV}" if conv_dim else "")
    config = LoraConfig(r=dim, lora_alpha=alpha, lora_dropout=dropout, target_modules=f"^(?:{targets})$",
                        rank_pattern={r"resnets\.\d+\.conv[12]": conv_dim} if conv_dim else {},
                        alpha_pattern={r"resnets\.\d+\.conv[12]": conv_alpha} if conv_dim else {},
                        init_lora_weights=True)
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
