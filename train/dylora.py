"""DyLoRA: one LoRA trained so that its first b ranks work on their own, for every b in unit, 2·unit, …, rank.

Each micro-batch every adapted layer draws b and runs with its ranks [0, b) at scale alpha/b (Valipour et al.'s
formula). A file sliced to its first b ranks keeps alpha, so loaders apply it at alpha/b: exactly what trained
(`lora resize` slices DyLoRA files). The layers are peft's LoRA layers: only their rank mask and scale change,
so states, resume, DDP and export are LoRA's. Every rank up to b trains (the paper's unfrozen variant): every
parameter receives a gradient each step, zero above b, which DDP requires.

LyCORIS' DyLoRA is not used: it scales by alpha / blocks rather than alpha / b, so with unit > 1 its sliced
files load at the wrong strength, and its ranks live in separate parameters DDP sees as unused.
"""

from __future__ import annotations


class RankSampler:
    """Draws each layer's rank before a micro-batch (from the trainer's generator, so a resumed run draws the
    same ranks) and restores full rank for everything else: validation, samples, export."""

    def __init__(self, models, unit: int):
        from lorasmith.models.adapters import lora_layers

        self.unit = unit
        self.layers = [layer for model in models for layer in lora_layers(model).values()]
        self.masks: dict[int, object] = {}
        for layer in self.layers:
            layer.lora_A["default"].register_forward_hook(self._truncate(id(layer)))

    def _truncate(self, key: int):
        def hook(module, inputs, output):
            mask = self.masks.get(key)
            if mask is None:
                return output
            shape = (-1,) + (1,) * (output.dim() - 2) if module.weight.dim() > 2 else (-1,)
            return output * mask.to(output.dtype).view(shape)
        return hook

    def draw(self, generator) -> list[int]:
        """One rank per layer, uniform over the multiples of unit up to the layer's rank."""
        import torch

        ranks = []
        for layer in self.layers:
            rank = layer.r["default"]
            b = self.unit * (int(torch.randint(rank // self.unit, (1,), generator=generator)) + 1)
            self.set_rank(layer, b)
            ranks.append(b)
        return ranks

    def set_rank(self, layer, b: int) -> None:
        import torch

        rank = layer.r["default"]
        device = layer.lora_A["default"].weight.device  # made where it is used: no copy per forward
        self.masks[id(layer)] = None if b >= rank else torch.arange(rank, device=device) < b
        layer.scaling["default"] = layer.lora_alpha["default"] / b

    def full(self) -> None:
        for layer in self.layers:
            self.set_rank(layer, layer.r["default"])
