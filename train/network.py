"""Adapters through peft (LoRA, LoCon, LoHa, LoKr; DyLoRA is LoRA with drawn ranks): which layers get one,
and the list of what trains.

peft's wrappers keep `base_layer`, start with ΔW = 0 (training starts from the base model exactly) and
compute scaling = alpha / r in one place; we only choose the type and the targets.
"""

from __future__ import annotations

from lorasmith.models.adapters import lora_layers  # noqa: F401  (train's tests and benches reach it here)

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


ADAPTER_MARKS = ("lora_", "hada_", "lokr_")
"""Parameter-name parts of peft's LoRA, LoHa and LoKr adapters: everything that trains."""


def adapter_config(module: str, dim: int, alpha: float, targets: str, *, dropout: float = 0.0,
                   rank_dropout: float = 0.0, module_dropout: float = 0.0, factor: int = -1, tucker: bool = False,
                   rank_pattern: dict | None = None, alpha_pattern: dict | None = None):
    """peft's config for one network type. LoHa and LoKr are peft's ports of LyCORIS' modules (the same
    parameters and formulas), so they train inside the model like LoRA: states, resume and DDP need nothing
    else."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    common = dict(target_modules=targets, rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})
    if module in ("lora", "locon", "dylora"):
        return LoraConfig(r=dim, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True, **common)
    lycoris = dict(r=dim, alpha=alpha, rank_dropout=rank_dropout, module_dropout=module_dropout,
                   use_effective_conv2d=tucker, init_weights=True, **common)
    if module == "loha":
        return LoHaConfig(**lycoris)
    if module == "lokr":
        return LoKrConfig(decompose_factor=factor, **lycoris)
    raise ValueError(f"unknown network module {module!r}")


def network_options(network) -> dict:
    """The type-specific keyword options of a NetworkConfig, for `add_unet_lora`/`add_text_lora`."""
    if network.network_module in ("lora", "locon", "dylora"):
        return {"module": network.network_module}
    options = dict(module=network.network_module, rank_dropout=network.rank_dropout,
                   module_dropout=network.module_dropout, tucker=network.use_tucker)
    if network.network_module == "lokr":
        options["factor"] = network.factor
    return options


def add_unet_lora(unet, dim: int, alpha: float, dropout: float = 0.0, conv_dim: int = 0, conv_alpha: float = 1.0,
                  target: str = "kohya", module: str = "lora", blocks=None, targets: str | None = None, **extra):
    """Adapters of `module`'s type on the UNet's `target` set; with conv_dim (or for locon) on its
    convolutions too, at conv_dim/conv_alpha for the 3×3 kernels. With `blocks` (a train/blocks.py BlockPlan)
    each module takes its block's rank and alpha instead, and blocks at rank 0 get no adapter. `targets`, a
    transformer family's own regex (`ModelFamily.targets`), replaces the UNet's sets."""
    from peft import inject_adapter_in_model

    if targets is not None:
        config = adapter_config(module, dim, alpha, targets, dropout=dropout, **extra)
        return _prepared(inject_adapter_in_model(config, unet), module, config)
    if module == "locon" and not conv_dim:
        conv_dim, conv_alpha = dim, alpha
    patterns = dict(rank_pattern={CONV_3X3: conv_dim}, alpha_pattern={CONV_3X3: conv_alpha}) if conv_dim else {}
    targets = unet_targets(target, bool(conv_dim))
    if blocks is not None:
        targets, patterns = _block_targets(unet, target, blocks)
    config = adapter_config(module, dim, alpha, targets, dropout=dropout, **patterns, **extra)
    return _prepared(inject_adapter_in_model(config, unet), module, config)


def share_fused_downs(model, groups: dict[str, list[str]]) -> int:
    """Each fused layer's parts (`groups`, a family's `fused_parts`: Flux's q, k, v, and in single blocks the MLP
    input too) made to share their first part's down projection, the number of downs shared. The parts read the
    same input, so one down with the parts' ups stacked is exactly the single LoRA Kohya trains on the fused
    weight (sd-scripts' default, split_qkv = false): rank r, not r per part."""
    layers, shared = lora_layers(model), 0
    for paths in groups.values():
        first = layers[paths[0]]
        for path in paths[1:]:
            layers[path].lora_A["default"] = first.lora_A["default"]
            shared += 1
    return shared


def _block_targets(unet, target: str, blocks) -> tuple[list[str], dict]:
    """The module list and rank/alpha patterns of a block plan: the target set's modules (with the convolution
    set when any block has a conv rank), less those in blocks at rank 0."""
    import re

    from lorasmith.train.schema import ConfigError

    pattern = unet_targets(target, blocks.conv)
    paths = [name for name, _ in unet.named_modules() if re.fullmatch(pattern, name)]
    conv3x3 = re.compile(rf"(?:.*\.)?(?:{CONV_3X3})")
    targets, ranks, alphas = blocks.arguments(paths, conv3x3.fullmatch)
    if not targets:
        raise ConfigError("network: every UNet block that holds adapters has rank 0 or learning-rate weight 0 "
                          "(block_dims, *_lr_weight, block_lr_zero_threshold): nothing would train")
    return targets, dict(rank_pattern=ranks, alpha_pattern=alphas)


def unet_param_groups(unet, lr: float, blocks=None) -> list[dict]:
    """The UNet's optimizer groups: one at `lr`, or with a block plan's learning-rate weights one per distinct
    weight at lr × weight. The group at weight 1 comes first (the logs show group 0's rate), the others in the
    order the UNet's modules first reach them: the same layout every run, so a resumed optimizer state fits."""
    if blocks is None or not blocks.lr:
        return [{"params": lora_parameters(unet), "lr": lr}]
    by_weight: dict[float, list] = {}
    for name, param in unet.named_parameters():
        if is_adapter(name):
            by_weight.setdefault(blocks.weight(adapter_path(name)), []).append(param)
    order = sorted(by_weight, key=lambda w: w != 1.0)  # stable: first reached stays first
    return [{"params": by_weight[w], "lr": lr * w} for w in order]


def adapter_path(param_name: str) -> str:
    """The adapted module of an adapter parameter: `…proj_in` for `…proj_in.lora_A.default.weight`."""
    parts = param_name.split(".")
    cut = next(i for i, part in enumerate(parts) if part.startswith(ADAPTER_MARKS))
    return ".".join(parts[:cut])


def add_text_lora(text_encoder, dim: int, alpha: float, dropout: float = 0.0, layers: int | None = None,
                  module: str = "lora", **extra):
    """Adapters on the first `layers` encoder layers (all when None): layers after the one whose output is used
    (clip skip, SDXL's penultimate layer) would never receive a gradient, and would be saved as untrained. A T5
    encoder (Flux's) takes Kohya's T5 set in every block."""
    from peft import inject_adapter_in_model

    from lorasmith.lorafile.export import T5_MODULES

    targets = TEXT_TARGETS
    if getattr(text_encoder.config, "model_type", "") == "t5":
        targets = T5_MODULES
    elif layers is not None:
        targets = targets.replace(r"layers\.\d+\.", rf"layers\.(?:{'|'.join(map(str, range(layers)))})\.")
    config = adapter_config(module, dim, alpha, f"^(?:{targets})$", dropout=dropout, **extra)
    return _prepared(inject_adapter_in_model(config, text_encoder), module, config)


def _prepared(model, module: str, config):
    """LoKr layers take Kronecker splits LyCORIS' loader reads back (train/lokr_split.py) and compute their
    product on the activations (train/lokr_bypass.py)."""
    if module == "lokr":
        from lorasmith.train.lokr_bypass import use_bypass
        from lorasmith.train.lokr_split import use_loadable_splits

        use_loadable_splits(model, config)
        use_bypass(model)
    return model


def is_adapter(name: str) -> bool:
    return any(mark in name for mark in ADAPTER_MARKS)


def lora_parameters(model) -> list:
    """The adapter weights of `model`, as a list: an iterator handed to the optimizer would be empty by the
    time gradient clipping reads it (the bug in diffusers' example script)."""
    return [p for name, p in model.named_parameters() if is_adapter(name)]


def freeze_base(model) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))


def describe_network(unet, texts, params, network, blocks: str = "", denoiser: str = "UNet") -> str:
    """One line: what is adapted and how much trains; `blocks` the block plan's own words, if any."""
    modules = len(lora_layers(unet))
    text = sum(len(lora_layers(e)) for e in texts)
    where = "Kohya's module set" if network.network_target == "kohya" else "the attention projections"
    kind = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr",
            "dylora": f"DyLoRA (unit {network.unit})"}[network.network_module]
    conv = f" + convolutions at rank {network.conv_dim}" if network.conv_dim else ""
    return (f"network: {kind} rank {network.network_dim} (alpha {network.network_alpha:g}){conv} on {where}: "
            f"{modules} {denoiser} modules, {text} text-encoder modules, {sum(p.numel() for p in params):,} trainable "
            "parameters" + (f"; {blocks}" if blocks else ""))
