"""The UNet modules a LoRA adapts: Kohya's set by default, the attention projections on request.

Kohya's rule, from its networks/lora.py (`create_modules`), is written here independently of lorasmith's regexes:
inside every module whose class is Transformer2DModel (and, with conv_dim, ResnetBlock2D, Downsample2D and
Upsample2D), every Linear and Conv2d is adapted; Linear and 1×1 convolutions at network_dim, larger kernels at
conv_dim. Kohya's logs print the counts: 192 UNet modules for SD1.5 (278 with conv_dim), 722 for SDXL.
"""

import re

import pytest
import torch
from torch import nn

from lorasmith.train.network import UNET_TARGETS, add_unet_lora, lora_layers, unet_targets

KOHYA_CLASSES = ["Transformer2DModel"]
KOHYA_CONV_CLASSES = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]


def kohya_modules(unet, conv: bool) -> dict[str, str]:
    """Module path → "dim" or "conv", by Kohya's class walk."""
    classes = KOHYA_CLASSES + (KOHYA_CONV_CLASSES if conv else [])
    found = {}
    for name, module in unet.named_modules():
        if type(module).__name__ in classes:
            for child_name, child in module.named_modules():
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    small = isinstance(child, nn.Linear) or child.kernel_size == (1, 1)
                    found[f"{name}.{child_name}"] = "dim" if small else "conv"
    return found


def meta_unet(size: str):
    from diffusers import UNet2DConditionModel

    from lorasmith.models.tiny import SIZES

    with torch.device("meta"):
        return UNet2DConditionModel(in_channels=4, out_channels=4, **SIZES[size]["unet"])


@pytest.mark.parametrize("size, conv, count", [("sd15", False, 192), ("sd15", True, 278), ("sdxl", False, 722),
                                               ("sdxl", True, 788)])
def test_the_kohya_target_set_is_the_module_list_kohya_adapts(size, conv, count):
    unet = meta_unet(size)
    pattern = unet_targets("kohya", conv)
    ours = sorted(name for name, _ in unet.named_modules() if re.fullmatch(pattern, name))
    theirs = kohya_modules(unet, conv)
    assert ours == sorted(theirs)
    if count is not None:
        assert len(ours) == count
    attention = [name for name, _ in unet.named_modules() if re.fullmatch(unet_targets("attention"), name)]
    assert len(attention) == {"sd15": 128, "sdxl": 560}[size] and set(attention) < set(ours)
    assert {"sd15": "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
            "sdxl": "mid_block.attentions.0.transformer_blocks.9.ff.net.2"}[size] in ours


def test_peft_puts_kohyas_ranks_on_the_tiny_sdxl_unet():
    """Injected for real: the same list, rank network_dim on Linear and 1×1 layers, conv_dim on 3×3 kernels."""
    from diffusers import UNet2DConditionModel

    from lorasmith.models.tiny import SIZES

    torch.manual_seed(0)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **SIZES["tiny-xl"]["unet"])
    theirs = kohya_modules(unet, conv=True)
    add_unet_lora(unet, 8, 4.0, conv_dim=2, conv_alpha=1.0)
    layers = lora_layers(unet)
    assert sorted(layers) == sorted(theirs)
    ranks = {path: ("conv" if layer.r["default"] == 2 else "dim") for path, layer in layers.items()}
    assert ranks == theirs and set(ranks.values()) == {"dim", "conv"}
    assert {layer.lora_alpha["default"] for path, layer in layers.items() if theirs[path] == "conv"} == {1.0}
    assert set(UNET_TARGETS) == {"kohya", "attention"}
