"""The peft adapter layers a model carries: what export names and the families walk."""

from __future__ import annotations


def lora_layers(model) -> dict[str, object]:
    """Module path → peft adapter layer (LoRA, LoHa or LoKr), for export and tests."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    kinds = (LoraLayer, LoHaLayer, LoKrLayer)
    return {name: module for name, module in model.named_modules() if isinstance(module, kinds)}
