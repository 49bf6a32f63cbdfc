"""Saving a LoRA in Kohya's format, the one ComfyUI, A1111/Forge and diffusers all load.

Keys (SD1.x/2.x): `lora_unet_<diffusers module path with _>` and `lora_te_text_model_encoder_layers_<i>_…` (a fixed
table: transformers ≥ 5.6 renamed the text encoder's modules, the file format did not change), each with
`.lora_down.weight`, `.lora_up.weight` and `.alpha` = the configured alpha. diffusers'
`convert_state_dict_to_kohya` is not used: it writes alpha = rank and names SD1.x's encoder `lora_te1`, so
loaders would apply the LoRA at the wrong strength. SDXL files name UNet modules by their original
(SGM) paths, `lora_unet_input_blocks_4_1_…`, and the encoders `lora_te1_`/`lora_te2_`, as Kohya writes them.
Flux files use BFL's block names (`lora_unet_double_blocks_0_img_attn_qkv`), one module per fused BFL layer.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from lorasmith.common.files import atomic_writer
from lorasmith.models.adapters import lora_layers

_TEXT_PATH = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")
T5_MODULES = r"encoder\.block\.\d+\.layer\.(?:0\.SelfAttention\.[qkvo]|1\.DenseReluDense\.(?:wi|wi_0|wi_1|wo))"
"""T5-XXL's (Flux's second encoder) attention and gated MLP layers (T5Attention, T5DenseGatedActDense): the ones
Kohya's lora_flux adapts, named `lora_te3_<path with _>`."""
_T5_PATH = re.compile(f"^{T5_MODULES}$")


def text_key(path: str, prefix: str = "lora_te") -> str:
    """Kohya's name for a text-encoder layer, whichever module layout transformers gave it; SDXL's two encoders
    are `lora_te1`/`lora_te2`, Flux's T5-XXL `lora_te3_encoder_block_0_layer_0_SelfAttention_q`."""
    if _T5_PATH.match(path):
        return f"{prefix}_{path.replace('.', '_')}"
    match = _TEXT_PATH.match(path)
    if not match:
        raise ValueError(f"no Kohya name for text-encoder module {path!r}")
    layer, part = match.groups()
    return f"{prefix}_text_model_encoder_layers_{layer}_{part.replace('.', '_')}"


def kohya_state_dict(unet, text_encoders=None, dtype=None, family=None) -> dict:
    """Every adapter as Kohya's down/up/alpha triple, in `dtype` (the save precision). `text_encoders` is one
    model or the family's list (None where the text encoders were not trained); `family` (SD1.x when None)
    names the modules."""
    import torch

    from lorasmith.models.families import family_named

    family = family or family_named("sd1")
    if text_encoders is not None and not isinstance(text_encoders, (list, tuple)):
        text_encoders = [text_encoders]
    tensors = {}
    layers = lora_layers(unet)
    for key, paths in family.fused_parts(unet).items():
        parts = [layer_tensors(layers[path]) for path in paths]
        for suffix, tensor in (parts[0] if len(parts) == 1 else stacked(parts, key)).items():
            tensors[f"{key}.{suffix}"] = tensor.to("cpu", dtype or torch.float32).contiguous()
    models = []
    for model, prefix in zip(text_encoders or (), family.text_prefixes):
        models.append((model, lambda path, prefix=prefix: text_key(path, prefix)))
    for model, keyer in models:
        for path, layer in lora_layers(model).items():
            key = keyer(path)
            for suffix, tensor in layer_tensors(layer).items():
                tensors[f"{key}.{suffix}"] = tensor.to("cpu", dtype or torch.float32).contiguous()
    return tensors


def stacked(parts: list[dict], key: str) -> dict:
    """LoRAs of layers that the original layout fuses into one (Flux's q, k, v) as that one's LoRA: downs stacked,
    ups block-diagonal, so ΔW of the fused weight is each part's ΔW in its rows. The file's alpha keeps the
    first part's alpha/rank over the summed rank; a part trained at another ratio carries the difference in its
    up weights. Parts that share one down (split_qkv = false) make Kohya's unsplit module: that down once, the
    ups stacked."""
    import torch

    if any("lora_down.weight" not in part for part in parts):
        raise ValueError(f"{key}: only LoRA layers can be stacked into one module")
    ranks = [part["lora_down.weight"].shape[0] for part in parts]
    ratio = float(parts[0]["alpha"]) / ranks[0]
    ups = [part["lora_up.weight"] * (float(part["alpha"]) / rank / ratio) for part, rank in zip(parts, ranks)]
    down = parts[0]["lora_down.weight"]
    if all(part["lora_down.weight"].data_ptr() == down.data_ptr() for part in parts):
        return {"lora_down.weight": down, "lora_up.weight": torch.cat(ups), "alpha": torch.tensor(ratio * ranks[0])}
    return {"lora_down.weight": torch.cat([part["lora_down.weight"] for part in parts]),
            "lora_up.weight": torch.block_diag(*ups), "alpha": torch.tensor(ratio * sum(ranks))}


def layer_tensors(layer, adapter: str = "default") -> dict:
    """One adapter layer as a file stores it: Kohya's lora_down/lora_up, or LyCORIS' hada_*/lokr_* tensors, and
    `.alpha`. Loaders scale a LoKr by alpha / rank only when a factor is decomposed; when both Kronecker factors
    are full they apply it as it is, so peft's alpha / r is folded into lokr_w2."""
    import torch
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer

    if isinstance(layer, (LoHaLayer, LoKrLayer)):
        out = {name: getattr(layer, name)[adapter].detach().float() for name in layer.adapter_layer_names
               if adapter in getattr(layer, name)}
        if "lokr_w1" in out and "lokr_w2" in out:
            out["lokr_w2"] = out["lokr_w2"] * layer.scaling[adapter]
        alpha = layer.alpha[adapter]
    else:
        out = {"lora_down.weight": layer.lora_A[adapter].weight.detach(),
               "lora_up.weight": layer.lora_B[adapter].weight.detach()}
        alpha = layer.lora_alpha[adapter]
    out["alpha"] = torch.tensor(float(alpha))
    return out


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
