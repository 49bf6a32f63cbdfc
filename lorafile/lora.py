"""A LoRA file's one in-memory form: Kohya module names, down/up/alpha per module (LoHa and LoKr as their exact
LoRA factors). Reading, binding, merging, resizing and inspecting all work on it, so a file's format matters
only to the reader (`read.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

FAMILY_BY_CONTEXT = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
"""The width of the text the UNet's cross-attention reads (attn2.to_k's input), per family."""


class LoraError(ValueError):
    """A LoRA file that cannot be read or does not fit; the message is one sentence naming the file."""


def _shape(tensor) -> str:
    return "×".join(map(str, tensor.shape))


@dataclass
class Module:
    down: object
    """[rank, in] for a linear layer, [rank, in, kh, kw] for a convolution."""
    up: object
    """[out, rank] or [out, rank, 1, 1]."""
    alpha: float
    alpha_given: bool = True
    """False when the file had no `.alpha` and alpha = rank was assumed, as Kohya's loaders do."""
    kind: str = "LoRA"
    """The file's adapter type: LoRA, or LoHa/LoKr read as their exact LoRA factors."""

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), *self.down.shape[1:])

    def problem(self) -> str:
        """What makes this module unusable ('' when nothing): factors whose shapes do not chain, a convolution
        kernel on `up`, non-finite values. Every subcommand checks it before using the module."""
        import torch

        down, up = self.down, self.up
        if down.dim() not in (2, 4) or up.dim() != down.dim():
            return f"down is {_shape(down)} and up is {_shape(up)}: a LoRA module is two 2-D or two 4-D factors"
        if up.shape[1] != down.shape[0]:
            return f"down has rank {down.shape[0]} but up has rank {up.shape[1]} ({_shape(down)}, {_shape(up)})"
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            return f"up is {_shape(up)}: its kernel must be 1×1"
        if not math.isfinite(self.alpha):
            return f"alpha is {self.alpha}"
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            return "holds NaN or infinite values"
        return ""

    def delta(self):
        """ΔW = up · down · alpha / rank in float32, shaped like the layer's weight: the one source for merging,
        resizing and the health checks."""
        down, up = self.down.float().flatten(1), self.up.float().flatten(1)
        return (up @ down * self.scale).reshape(self.weight_shape)


@dataclass
class Lora:
    name: str
    """The file's base name, for messages and generation parameters; never a path."""
    modules: dict[str, Module]
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "kohya"

    @property
    def stem(self) -> str:
        return Path(self.name).stem


def check_lora(lora: Lora) -> Lora:
    """`lora` when every module is usable; else a LoraError naming the first broken module and how many are, so
    nothing is drawn, merged or resized from a file that cannot mean what it says."""
    broken = [(key, problem) for key, module in sorted(lora.modules.items()) if (problem := module.problem())]
    if broken:
        key, problem = broken[0]
        more = f" ({len(broken)} modules are broken)" if len(broken) > 1 else ""
        raise LoraError(f"{lora.name}: {key}: {problem}{more}; the file is damaged: export it again")
    return lora


def kohya_tensors(lora: Lora, dtype=None) -> dict:
    """The modules as Kohya's down/up/alpha triples, the layout every UI loads."""
    import torch

    out = {}
    for key, module in sorted(lora.modules.items()):
        out[f"{key}.lora_down.weight"] = module.down.to(dtype or module.down.dtype).contiguous()
        out[f"{key}.lora_up.weight"] = module.up.to(dtype or module.up.dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(module.alpha), dtype=dtype or torch.float32)
    return out


def family_hint(lora: Lora) -> str:
    """The base model family a file was made for, from its metadata or else its shapes: for messages and `info`."""
    version = lora.metadata.get("ss_base_model_version", "") + lora.metadata.get("modelspec.architecture", "")
    for mark, family in (("flux", "Flux.1"), ("sdxl", "SDXL"), ("xl-v1", "SDXL"), ("v2", "SD2.x"), ("sd_v1", "SD1.x"),
                         ("v1", "SD1.x")):
        if mark in version:
            return family
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in lora.modules):
        return "Flux.1"
    if any(k.startswith("lora_te2_") for k in lora.modules):
        return "SDXL"
    widths = {int(m.down.shape[1]) for k, m in lora.modules.items() if k.endswith("attn2_to_k")}
    return FAMILY_BY_CONTEXT.get(next(iter(widths), 0), "unknown")
