"""Putting LoRA files on a base model: which layer each module names, checked before anything changes.

A file that does not fit (another model family, another rank layout, names no layer knows) is refused with
one sentence, never loaded half-way: "lora key not loaded" is the interop complaint users meet most.
On the fly, adapters go through diffusers' `load_lora_weights` in peft's own format (scale folded into B),
so any mix of files at any weights is `set_adapters`; merged, ΔW is added to the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lorasmith.lorafile.export import text_key
from lorasmith.lorafile.read import FAMILY_BY_CONTEXT, Lora, LoraError, family_hint


@dataclass(frozen=True)
class Layer:
    component: str
    """The pipeline part: `unet`, `transformer` (Flux) or `text_encoder`."""
    path: str
    """Its module path inside that part."""
    shape: tuple[int, ...]
    """The weight's shape, which a module's ΔW must equal."""


def layer_table(unet, text_encoder=None, aliases: bool = True, text_encoder_2=None) -> dict[str, Layer]:
    """Kohya name → layer, for every linear and convolution a LoRA may adapt; with `aliases`, UNet layers are
    also found under their original block names. With `text_encoder_2` the encoders are `lora_te1` and
    `lora_te2` (SDXL) or `lora_te3` (Flux's T5-XXL), else the one encoder is `lora_te`."""
    import torch
    from functools import partial

    table = {}
    flux = hasattr(unet, "single_transformer_blocks")
    if flux:  # BFL's names, a fused module's parts as `name:part` (see `split_fused`)
        from lorasmith.models.family_flux import layer_key

        parts = [("transformer", unet, layer_key)]
        aliases = False
    else:
        parts = [("unet", unet, lambda p: "lora_unet_" + p.replace(".", "_"))]
    if text_encoder is not None:
        parts.append(("text_encoder", text_encoder,
                      partial(text_key, prefix="lora_te1") if text_encoder_2 is not None else text_key))
    if text_encoder_2 is not None:  # Flux's T5-XXL is Kohya's `lora_te3` (OneTrainer's `lora_te2`, an alias)
        parts.append(("text_encoder_2", text_encoder_2, partial(text_key, prefix="lora_te3" if flux else "lora_te2")))
    for component, model, keyer in parts:
        for path, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or ".lora_" in path:
                continue
            path = path.removesuffix(".base_layer")  # a layer peft already wraps
            try:
                key = keyer(path)
            except ValueError:
                continue
            table[key] = Layer(component, path, tuple(module.weight.shape))
    if aliases:
        table.update(_original_aliases(unet, table))
    if flux:
        table.update({key.replace("lora_te3_", "lora_te2_", 1): layer for key, layer in table.items()
                      if key.startswith("lora_te3_")})
    return table


def _original_aliases(unet, table: dict[str, Layer]) -> dict[str, Layer]:
    """The UNet's layers under their original (LDM/SGM) names too, `lora_unet_input_blocks_1_1_proj_in`, which
    some trainers write and every UI maps."""
    from lorasmith.models.ldm_names import original_key, unet_modules

    modules, aliases = unet_modules(unet), {}
    for layer in table.values():
        if layer.component == "unet":
            try:
                name = original_key(layer.path + ".weight", modules, "UNet").removesuffix(".weight")
            except ValueError:
                continue
            aliases["lora_unet_" + name.replace(".", "_")] = layer
    return aliases


def split_fused(lora: Lora, table: dict[str, Layer]) -> Lora:
    """`lora` with each module that a fused layer of the file's layout holds (Flux's `…_img_attn_qkv`, q, k and v
    in one weight) split into one module per layer of the model: the same down, the up's rows of that layer,
    the same alpha, so each layer's ΔW is exactly its rows of the fused ΔW."""
    from dataclasses import replace

    modules = {}
    for key, module in lora.modules.items():
        if key in table or f"{key}:0" not in table:
            modules[key] = module
            continue
        rows = []
        while f"{key}:{len(rows)}" in table:
            rows.append(table[f"{key}:{len(rows)}"].shape[0])
        if sum(rows) != module.up.shape[0]:
            modules[key] = module  # the wrong shape: bind names it
            continue
        start = 0
        for i, count in enumerate(rows):
            modules[f"{key}:{i}"] = replace(module, up=module.up[start : start + count])
            start += count
    return replace(lora, modules=modules)


def model_family(table: dict[str, Layer]) -> str:
    width = next((layer.shape[1] for key, layer in table.items() if key.endswith("attn2_to_k")), 0)
    return FAMILY_BY_CONTEXT.get(width, "")


def _rename(key: str, table: dict[str, Layer]) -> str:
    # diffusers' convert_state_dict_to_kohya names SD1.x's only text encoder `lora_te1`.
    if key.startswith("lora_te1_") and key.replace("lora_te1_", "lora_te_", 1) in table:
        return key.replace("lora_te1_", "lora_te_", 1)
    return key


def _same_shape(file: tuple[int, ...], layer: tuple[int, ...]) -> bool:
    """Equal, or equal but for a 1×1 kernel: a linear-shaped module fits a 1×1 convolution (SD1's proj_in) and
    back, as UIs map them."""
    def squeeze(shape):
        return tuple(shape[:2]) if len(shape) == 4 and tuple(shape[2:]) == (1, 1) else tuple(shape)

    return tuple(file) == tuple(layer) or squeeze(file) == squeeze(layer)


def unknown_names(lora: Lora, table: dict[str, Layer]) -> list[str]:
    """The file's modules that name no layer of `table`, UNet modules first (as `bind` reports them)."""
    missing = [k for k in lora.modules if _rename(k, table) not in table and f"{k}:0" not in table]
    return sorted(missing, key=lambda k: not k.startswith("lora_unet_"))


def bind(lora: Lora, table: dict[str, Layer], base: str = "this base model") -> dict[str, Layer]:
    """Each module's layer; a LoraError naming the file and what does not fit, if anything does not."""
    bound, missing, wrong, seen = {}, [], [], {}
    for key, module in lora.modules.items():
        layer = table.get(_rename(key, table))
        if layer is None:
            missing.append(key)
        elif (layer.component, layer.path) in seen:
            raise LoraError(f"{lora.name} holds two modules for one layer ({seen[layer.component, layer.path]} and "
                            f"{key}): the file mixes two naming schemes; rebuild it")
        elif not _same_shape(module.weight_shape, layer.shape):
            wrong.append((key, module.weight_shape, layer.shape))
        else:
            bound[key] = layer
            seen[layer.component, layer.path] = key
    made_for, base_family = family_hint(lora), model_family(table)
    family = "" if made_for in ("unknown", base_family) else f"; the file was made for {made_for}" + (
        f", the base model is {base_family}" if base_family else "")
    if missing:
        missing.sort(key=lambda k: not k.startswith("lora_unet_"))
        raise LoraError(f"{lora.name} does not fit {base}: {len(missing)} of {len(lora.modules)} modules "
                        f"name no layer in it (e.g. {missing[0]}){family}")
    if wrong:
        key, have, want = wrong[0]
        raise LoraError(f"{lora.name} does not fit {base}: {len(wrong)} of {len(lora.modules)} modules have "
                        f"the wrong shape (e.g. {key} is {'×'.join(map(str, have))} in the file, "
                        f"{'×'.join(map(str, want))} in the model){family}")
    return bound


def peft_state_dict(lora: Lora, bound: dict[str, Layer]) -> dict:
    """The modules under diffusers' peft key names, alpha / rank folded into B, so peft's own scaling is 1
    and ranks may differ per module."""
    out = {}
    for key, module in lora.modules.items():
        layer = bound[key]
        prefix = f"{layer.component}.{layer.path}"
        down, up = module.down.float(), module.up.float() * module.scale
        if len(layer.shape) != down.dim():  # a 1×1 convolution and a linear module, either way round
            extra = [1] * (len(layer.shape) - 2)
            down, up = down.reshape(down.shape[0], -1, *extra), up.reshape(up.shape[0], -1, *extra)
        out[f"{prefix}.lora_A.weight"] = down.contiguous()
        out[f"{prefix}.lora_B.weight"] = up.contiguous()
    return out


def load_adapters(pipe, loras: dict[str, Lora]) -> None:
    """Every file as a named adapter of `pipe`, checked first, so a bad file changes nothing."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    table = layer_table(denoiser, pipe.text_encoder, text_encoder_2=getattr(pipe, "text_encoder_2", None))
    split = {name: split_fused(lora, table) for name, lora in loras.items()}
    states = {name: peft_state_dict(lora, bind(lora, table)) for name, lora in split.items()}
    own = set(type(pipe)._lora_loadable_modules)
    extra = sorted({key.split(".", 1)[0] for state in states.values() for key in state} - own)
    if extra:  # Flux's T5-XXL: FluxPipeline loads LoRAs into CLIP-L alone; set_adapters then reaches T5 too
        pipe._lora_loadable_modules = [*type(pipe)._lora_loadable_modules, *extra]
    for name, state in states.items():
        pipe.load_lora_weights({k: v for k, v in state.items() if k.split(".", 1)[0] in own}, adapter_name=name)
        for component in extra:
            part = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(component + ".")}
            if part:
                _load_into(getattr(pipe, component), part, name)


def _load_into(model, state: dict, name: str) -> None:
    """peft's own state (scale folded into B) as adapter `name` of a transformers model, at each module's rank."""
    from peft import LoraConfig

    ranks = {key.removesuffix(".lora_A.weight"): tensor.shape[0] for key, tensor in state.items()
             if key.endswith(".lora_A.weight")}
    patterns = {re.escape(path): rank for path, rank in ranks.items()}
    config = LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=list(ranks),
                        rank_pattern=patterns, alpha_pattern=patterns)
    model.load_adapter(adapter_name=name, adapter_state_dict=state, peft_config=config)


def activate(pipe, weights: dict[str, float]) -> None:
    """Only the named adapters at their weights; none at all leaves the base model untouched."""
    if not weights:
        if pipe.get_list_adapters():
            pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))


def merge_into(models: dict, loras: list[tuple[Lora, float]]) -> int:
    """Add weight × ΔW of every file to the models' weights in place (`models`: component → module);
    the number of layers changed. All files are checked before the first weight changes."""
    import torch

    denoiser = models.get("unet") or models["transformer"]
    models = {**models, "transformer": denoiser}
    table = layer_table(denoiser, models.get("text_encoder"), text_encoder_2=models.get("text_encoder_2"))
    plans = [(lora, weight, bind(lora, table)) for lora, weight in
             ((split_fused(lora, table), weight) for lora, weight in loras)]
    changed = set()
    with torch.no_grad():
        for lora, weight, bound in plans:
            for key, module in lora.modules.items():
                layer = bound[key]
                target = models[layer.component].get_submodule(layer.path).weight
                delta = module.delta().reshape(target.shape) * weight
                if not torch.isfinite(delta).all():
                    raise LoraError(f"{lora.name}: {key} holds non-finite values; merging it would ruin the model")
                target.add_(delta.to(target.device, target.dtype))
                changed.add((layer.component, layer.path))
    return len(changed)
