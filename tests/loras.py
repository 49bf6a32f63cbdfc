"""LoRA files made in tests: random modules in Kohya's or diffusers' layout, for any base model's layer table."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file


def random_modules(table: dict, seed: int, rank: int = 4, select=lambda key: True, scale: float = 0.3) -> dict:
    """Kohya key → (down, up) with random values for the layers `select` picks (linear and 1×1 conv only,
    unless a 3×3 conv is selected: then a LoCon module)."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for key, layer in sorted(table.items()):
        if not select(key):
            continue
        out, rest = layer.shape[0], layer.shape[1:]
        down = torch.randn(rank, *rest, generator=generator) * scale
        up = torch.randn(out, rank, *([1] * (len(rest) - 1)), generator=generator) * scale
        modules[key] = (down, up)
    return modules


def write_kohya(path: Path, modules: dict, alpha: float | None = 2.0, metadata: dict | None = None,
                rename=lambda key: key) -> Path:
    tensors = {}
    for key, (down, up) in modules.items():
        name = rename(key)
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), {"ss_base_model_version": "sd_v1", **(metadata or {})})
    return path


def attention_and_text(key: str) -> bool:
    return ("attn" in key and "to_" in key) or key.startswith("lora_te_")
