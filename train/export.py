"""Saving a LoRA in Kohya's format, the one ComfyUI, A1111/Forge and diffusers all load.

Keys: `lora_unet_<diffusers module path with _>` and `lora_te_text_model_encoder_layers_<i>_…` (a fixed
table: transformers ≥ 5.6 renamed the text encoder's modules, the file format did not change), each with
`.lora_down.weight`, `.lora_up.weight` and `.alpha` = the configured alpha. diffusers'
`convert_state_dict_to_kohya` is not used: it writes alpha = rank and names SD1.x's encoder `lora_te1`, so
loaders would apply the LoRA at the wrong strength.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from lorasmith.prep.files import atomic_writer
from lorasmith.train.network import lora_layers

_TEXT_PATH = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")


def unet_key(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def text_key(path: str) -> str:
    """Kohya's name for a text-encoder layer, whichever module layout transformers gave it."""
    match = _TEXT_PATH.match(path)
    if not match:
        raise ValueError(f"no Kohya name for text-encoder module {path!r}")
    layer, part = match.groups()
    return f"lora_te_text_model_encoder_layers_{layer}_{part.replace('.', '_')}"


def kohya_state_dict(unet, text_encoder=None, dtype=None) -> dict:
    """Every adapter as Kohya's down/up/alpha triple, in `dtype` (the save precision)."""
    import torch

    tensors = {}
    for model, keyer in ((unet, unet_key), (text_encoder, text_key)):
        if model is None:
            continue
        for path, layer in lora_layers(model).items():
            key = keyer(path)
            down = layer.lora_A["default"].weight.detach()
            up = layer.lora_B["default"].weight.detach()
            tensors[f"{key}.lora_down.weight"] = down.to("cpu", dtype or down.dtype).contiguous()
            tensors[f"{key}.lora_up.weight"] = up.to("cpu", dtype or up.dtype).contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha["default"]), dtype=dtype or torch.float32)
    return tensors


def addnet_hashes(data: bytes) -> tuple[str, str]:
    """Kohya's `sshs_model_hash` (sha256 of the tensor bytes after the header) and `sshs_legacy_hash`
    (first 8 hex digits of sha256 over 64 KiB at offset 1 MiB), as the additional-networks UIs show them."""
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header :]).hexdigest()
    legacy = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy


def save_lora(path: Path, tensors: dict, metadata: dict[str, str]) -> Path:
    """Write the file under a temporary name, fsync it, then rename: a reader never sees half a LoRA.

    The hashes are taken, as Kohya's `precalculate_safetensors_hashes` does, over the file as it would be
    with only the `ss_*` metadata: the legacy hash reads at a fixed offset, which the header's length moves.
    """
    from safetensors.torch import save

    metadata = {k: str(v) for k, v in metadata.items()}
    model_hash, legacy = addnet_hashes(save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")}))
    metadata.update(sshs_model_hash=model_hash, sshs_legacy_hash=legacy)
    with atomic_writer(path, fsync=True) as handle:
        handle.write(save(tensors, metadata))
    return path
