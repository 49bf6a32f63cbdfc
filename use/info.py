"""`lora info`: what a LoRA file is, what it was trained on, and whether it is healthy — before a user
spends an evening wondering why it does nothing.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from pathlib import Path

from lorasmith.lorafile.read import Lora

_BLOCK = re.compile(r"^lora_unet_((?:down|up|input|output)_blocks_\d+|mid(?:dle)?_block|[a-z_]+?)(?:_|$)"
                    r"|^(lora_te\d?)_")
"""diffusers' block names and the original (SGM) ones SDXL files use: `input_blocks_4`, `middle_block`."""


def block_of(key: str) -> str:
    """The block a module belongs to, for the rank/alpha table: `down_blocks.0`, `input_blocks.4`, `mid_block`,
    `text encoder 2`."""
    match = _BLOCK.match(key)
    if not match:
        return "other"
    if match.group(2):
        return {"lora_te": "text encoder", "lora_te1": "text encoder 1", "lora_te2": "text encoder 2",
                "lora_te3": "text encoder 3 (T5-XXL)"}.get(match.group(2), "other")
    return match.group(1).replace("_blocks_", "_blocks.")


def network_type(lora: Lora) -> str:
    """LoHa/LoKr as the file stores them; else LoCon when any convolution beyond 1×1 is adapted (Kohya's
    conv_dim), LoRA otherwise."""
    kinds = sorted({m.kind for m in lora.modules.values()} - {"LoRA"})
    if kinds:
        return " + ".join(kinds) + " (LyCORIS; ranks below are those of the exact LoRA factors)"
    spatial = any(m.down.dim() == 4 and tuple(m.down.shape[2:]) != (1, 1) for m in lora.modules.values())
    return "LoCon (LoRA with 3×3 convolutions)" if spatial else "LoRA"


def health(lora: Lora, table=None, base: str = "this base model") -> list[str]:
    """Problems a loader would hit or a user would not see: non-finite values, untrained modules, missing
    alphas, names no layer of the base model has."""
    import torch

    from lorasmith.use.apply import bind, split_fused
    from lorasmith.lorafile.read import LoraError

    problems = []
    bad = [k for k, m in lora.modules.items() if not (torch.isfinite(m.down).all() and torch.isfinite(m.up).all())]
    if bad:
        problems.append(f"{len(bad)} modules hold NaN or infinite values (e.g. {bad[0]}): the file is broken")
    broken = [(k, p) for k, m in sorted(lora.modules.items()) if (p := m.problem()) and k not in bad]
    if broken:
        problems.append(f"{len(broken)} modules cannot be used (e.g. {broken[0][0]}: {broken[0][1]}): the file is "
                        "broken")
        return problems  # their shapes would mislead the checks below
    zero = [k for k, m in lora.modules.items() if not m.up.any()]
    if zero:
        problems.append(f"{len(zero)} of {len(lora.modules)} modules have an all-zero up weight (untrained: they "
                        f"change nothing), e.g. {zero[0]}")
    if lora.format == "kohya":
        missing = [k for k, m in lora.modules.items() if not m.alpha_given]
        if missing:
            problems.append(f"{len(missing)} modules have no .alpha; loaders then use alpha = rank (e.g. {missing[0]})")
    if table is not None:
        try:
            bind(split_fused(lora, table), table, base)
        except LoraError as exc:
            problems.append(str(exc))
    return problems


PUBLIC_BASES = {"SD1.x": "the SD1.5 architecture", "SD2.x": "the SD2.1 architecture",
                "SDXL": "the SDXL base architecture"}
"""Families whose public architecture `info` and `resize` rebuild (without weights) to check names when no
--model is given."""


def context_width(lora: Lora) -> int:
    """The text width the file's cross-attention keys read (attn2.to_k's input), 0 when it adapts none."""
    return next((int(m.down.shape[1]) for k, m in lora.modules.items() if k.endswith("attn2_to_k")), 0)


def reference(lora: Lora) -> tuple[object, str, str]:
    """(layer table, its name, a note for the user) to check a file's names against when no base model is
    given: the public architecture its metadata names. A file whose shapes belong to no public base (a custom
    or test model) gets no table and a note saying its names were not checked, not a verdict."""
    from lorasmith.lorafile.read import FAMILY_BY_CONTEXT, family_hint

    family, width = family_hint(lora), context_width(lora)
    if width and FAMILY_BY_CONTEXT.get(width) != family:
        return None, "", (f"not checked: its cross-attention reads {width}-wide text, which no public {family} base "
                          "has (a custom base); pass --model BASE to check them")
    if family not in PUBLIC_BASES:
        return None, "", f"not checked against {family}: pass --model BASE to check them"
    return reference_table(family), PUBLIC_BASES[family], f"checked against {PUBLIC_BASES[family]}"


def _public_spec(family: str) -> dict:
    """Constructor kwargs of a family's public base: SD1.5 and SDXL base as models/tiny.py builds them for
    benchmarks, SD2.1 as its diffusers configs say (OpenCLIP-H with the 23 layers diffusers keeps)."""
    from lorasmith.models.tiny import SIZES

    if family == "SD2.x":
        unet = dict(SIZES["sd15"]["unet"], cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                    use_linear_projection=True)
        return {"unet": unet, "texts": [dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                              num_attention_heads=16, vocab_size=49408, hidden_act="gelu")]}
    if family == "SDXL":
        spec = SIZES["sdxl"]
        return {"unet": spec["unet"], "texts": [dict(spec["text"], hidden_act="quick_gelu"),
                                                  dict(spec["text_2"], hidden_act="gelu")]}
    return {"unet": SIZES["sd15"]["unet"], "texts": [SIZES["sd15"]["text"]]}


@functools.cache
def reference_table(family: str):
    """A public base's layer names and shapes (PUBLIC_BASES), built on the meta device: no weights, no download,
    about a second even for SDXL, and once per process."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lorasmith.use.apply import layer_table

    if family not in PUBLIC_BASES:
        return None
    spec = _public_spec(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
        texts = [cls(CLIPTextConfig(max_position_embeddings=77, **text))
                 for cls, text in zip((CLIPTextModel, CLIPTextModelWithProjection), spec["texts"])]
    return layer_table(unet, texts[0], text_encoder_2=texts[1] if len(texts) > 1 else None)


def base_table(model: str):
    """The layer table of a base model the user names (SD1.x, SD2.x or SDXL base; hub id, folder or single file):
    its UNet and every text encoder of its family, nothing else loaded."""
    from lorasmith.models.base import inspect_base, load_components, resolve_name
    from lorasmith.models.families import FAMILIES, family_named
    from lorasmith.use.apply import layer_table

    name = resolve_name(model)[0]
    family = family_named(inspect_base(name)[0])
    parts = load_components(name, ("unet", *family.text_parts), families=FAMILIES)
    return layer_table(parts.unet, parts.text_encoder, text_encoder_2=parts.text_encoder_2)


def _top_tags(metadata: dict[str, str], count: int = 10) -> list[tuple[str, int]]:
    try:
        folders = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return []
    total: Counter = Counter()
    for tags in folders.values() if isinstance(folders, dict) else ():
        total.update({t: int(n) for t, n in tags.items() if isinstance(n, (int, float))})
    return total.most_common(count)


LEGACY_OFFSET = 0x100000
"""A1111's legacy hash reads 64 KiB from 1 MiB into the file: of a smaller file it hashes nothing."""


def describe(path: Path, lora: Lora, table=None, computed_hash: str = "",
             base: str = "this base model", names: str = "") -> tuple[list[str], list[str]]:
    """(lines, problems) for one file; `names` says what its module names were checked against."""
    from lorasmith.lorafile.read import family_hint
    from lorasmith.use.lowrank import dylora_unit

    meta = lora.metadata
    unet = sum(1 for k in lora.modules if k.startswith("lora_unet_"))
    lines = [f"{path.name}  ({path.stat().st_size / 1e6:.1f} MB, {lora.format} format)",
             f"  base model family: {family_hint(lora)}" + (f"  (trained on {meta['ss_sd_model_name']})"
                                                            if meta.get("ss_sd_model_name") else ""),
             f"  network: {network_type(lora)}" + (f" ({meta['ss_network_module']})" if meta.get("ss_network_module") else "")
             + "; "
             f"{unet} UNet modules, {len(lora.modules) - unet} text-encoder modules"]
    unit = dylora_unit(lora)
    if unit:
        rank = max(m.rank for m in lora.modules.values())
        lines.append(f"  DyLoRA: its first {unit}, {2 * unit}, … {rank} ranks each work alone; "
                     f"`lora resize {path.name} --rank N` keeps the first N")
    blocks: dict[str, set] = {}
    for key, module in lora.modules.items():
        blocks.setdefault(block_of(key), set()).add((module.rank, module.alpha))
    for block, pairs in sorted(blocks.items()):
        lines.append(f"    {block:<16} " + ", ".join(f"rank {r} alpha {a:g}" for r, a in sorted(pairs)))
    trigger = meta.get("modelspec.trigger_phrase")
    if trigger:
        lines.append(f"  trigger phrase: {trigger}")
    tags = _top_tags(meta)
    if tags:
        lines.append("  top tags: " + ", ".join(f"{t} ({n})" for t, n in tags))
    training = [(label, meta.get(key)) for label, key in (("steps", "ss_steps"), ("epoch", "ss_epoch"),
                ("of epochs", "ss_num_epochs"), ("resolution", "ss_resolution"), ("lr", "ss_learning_rate"),
                ("clip skip", "ss_clip_skip"), ("image views per epoch (images × repeats)", "ss_num_train_images"))]
    if any(v for _, v in training):
        lines.append("  training: " + ", ".join(f"{label} {v}" for label, v in training if v))
    stored = meta.get("sshs_model_hash", "")
    if stored or computed_hash:
        state = "" if not stored else (" (matches the tensors)" if stored == computed_hash else
                                       " (does NOT match the tensors: the file was changed after saving)")
        legacy = (meta.get("sshs_legacy_hash", "-") if path.stat().st_size > LEGACY_OFFSET else
                  "n/a (the file is under 1 MiB, where A1111's legacy hash reads nothing)")
        lines.append(f"  hashes: sshs_model_hash {stored or computed_hash}{state}; legacy {legacy}")
    if names:
        lines.append(f"  names: {names}")
    problems = health(lora, table, base)
    lines += [f"  health: {p}" for p in problems] or ["  health: ok"]
    return lines, problems
