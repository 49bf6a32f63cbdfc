"""`lora merge` and `lora resize`: files out, each naming in its metadata what went in.

A checkpoint with LoRAs baked in costs nothing extra at inference; a merged or resized LoRA is an ordinary
Kohya-format file that every UI loads. Outputs appear under their real name only when complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from lorasmith.lorafile.export import save_lora
from lorasmith.models.families import family_named
from lorasmith.lorafile.metadata import model_name
from lorasmith.lorafile.read import Lora, LoraError, kohya_tensors
from lorasmith.use.lowrank import Kept
from lorasmith.use.outputs import MARKER, swap_in


def inputs_metadata(loras: list[tuple[Lora, float]]) -> str:
    """What went in, by base name, weight and hash: shareable, no paths."""
    return json.dumps([{"file": lora.name, "weight": weight, "sshs_model_hash": lora.metadata.get("sshs_model_hash", "")}
                       for lora, weight in loras])


def lora_metadata(lora: Lora, sources: list[tuple[Lora, float]], note: str) -> dict[str, str]:
    """The first source's training record, with rank/alpha rewritten for what the file now holds."""
    meta = {k: v for k, v in (sources[0][0].metadata if sources else lora.metadata).items()
            if k.startswith(("ss_", "modelspec.")) and k not in ("ss_network_dim", "ss_network_alpha")}
    ranks = {m.rank for m in lora.modules.values()}
    alphas = {m.alpha for m in lora.modules.values()}
    meta.update({
        "ss_network_module": "networks.lora_flux" if meta.get("ss_base_model_version") == "flux1" else
                             "networks.lora",
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": f"{alphas.pop():g}" if len(alphas) == 1 else "Dynamic",
        "ss_training_comment": note,
        "lorasmith_sources": inputs_metadata(sources),
    })
    meta.setdefault("modelspec.sai_model_spec", "1.0.0")
    meta.setdefault("modelspec.architecture", "stable-diffusion-v1/lora")
    meta["modelspec.title"] = Path(lora.name).stem
    return meta


def write_lora(path: Path, lora: Lora, metadata: dict[str, str], dtype=None) -> Path:
    return save_lora(path, kohya_tensors(lora, dtype), metadata)


def kept_lines(report: list[Kept], limit: int = 12) -> list[str]:
    """A summary of an SVD: ranks and the share of ΔW kept, the worst modules first."""
    if not report:
        return ["no modules"]
    shares = sorted(report, key=lambda k: k.share)
    mean = sum(k.share for k in report) / len(report)
    ranks = sorted({k.rank_after for k in report})
    lines = [f"{len(report)} modules, rank {ranks[0]}" + (f"–{ranks[-1]}" if len(ranks) > 1 else "")
             + f"; ΔW kept (Frobenius): mean {100 * mean:.2f}%, lowest {100 * shares[0].share:.2f}%"]
    lines += [f"  {100 * k.share:6.2f}%  rank {k.rank_before:>3} → {k.rank_after:<3} {k.key}" for k in shares[:limit]]
    return lines


BASE_PARTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


def merge_checkpoint(model: str, loras: list[tuple[Lora, float]], out: Path, fmt: str, dtype=None) -> tuple[Path, int]:
    """The base model (SD1.x, SD2.x or SDXL base) with every LoRA added at its weight, as one original-layout
    `.safetensors` file (A1111, ComfyUI) or a diffusers folder; (path, layers changed). All files are checked
    before any write."""
    from lorasmith.models.base import inspect_base, load_components, quiet_libraries, resolve_name
    from lorasmith.models.families import FAMILIES
    from lorasmith.use.apply import merge_into

    quiet_libraries()
    name = resolve_name(model)[0]
    family = family_named(inspect_base(name)[0])
    if family.denoiser != "unet" and fmt != "diffusers":
        return merge_transformer_file(name, model, loras, out, family, dtype)
    extra = family.tokenizer_parts[1:] + family.text_parts[1:]  # SDXL's and Flux's second encoder, its tokenizer
    parts = load_components(name, BASE_PARTS + extra, families=FAMILIES)
    changed = merge_into({"unet": parts.unet, **{p: getattr(parts, p) for p in family.text_parts}}, loras)
    metadata = checkpoint_metadata(model, loras, family, parts.scheduler.config.get("prediction_type", ""), out)
    if fmt == "diffusers":
        return write_folder(parts, out, metadata, dtype, family), changed
    from lorasmith.models.checkpoint import original_state_dict, save_checkpoint

    state = original_state_dict(parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2)
    state.update(identity_keys(parts.scheduler.config))
    return save_checkpoint(out, state, metadata, dtype), changed


def merge_transformer_file(name: str, model: str, loras: list[tuple[Lora, float]], out: Path, family,
                           dtype=None) -> tuple[Path, int]:
    """A transformer family's merged denoiser alone, in its original single-file layout (Flux.1: BFL's, the file
    ComfyUI loads as a diffusion model); files with text-encoder modules are refused, since it cannot hold them."""
    from lorasmith.models.base import configure_family, load_components
    from lorasmith.models.checkpoint import save_checkpoint
    from lorasmith.models.families import FAMILIES
    from lorasmith.models.flux_file import bfl_state_dict
    from lorasmith.use.apply import merge_into

    for lora, _ in loras:
        text = sorted(k for k in lora.modules if not k.startswith("lora_unet_"))
        if text:
            raise LoraError(f"{lora.name} also adapts the text encoders (e.g. {text[0]}), which a {family.label} "
                            "transformer file cannot hold: add --format diffusers to keep them")
    configure_family(family, name)
    parts = load_components(name, ("unet", "scheduler"), families=FAMILIES)
    changed = merge_into({"unet": parts.unet}, loras)
    metadata = checkpoint_metadata(model, loras, family, "", out)
    return save_checkpoint(out, bfl_state_dict(parts.unet), metadata, dtype), changed


def checkpoint_metadata(model: str, loras: list[tuple[Lora, float]], family, prediction_type: str,
                        out: Path) -> dict[str, str]:
    """What went in (base and LoRA names, never paths) and the architecture as the family registry names it, so
    a UI or hub lists the merged file under the right base."""
    return {"lorasmith_base_model": model_name(model), "lorasmith_merged_loras": inputs_metadata(loras),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": family.architecture(prediction_type)[1].removesuffix("/lora"),
            **({"modelspec.prediction_type": prediction_type} if prediction_type else {}), "modelspec.title": out.stem}


def identity_keys(scheduler_config) -> dict:
    """The marker tensors single-file readers take the noise schedule from, which the weights alone do not say:
    ComfyUI's empty `v_pred`, and `ztsnr` for a zero-terminal-SNR schedule, as its own checkpoint saver writes
    them. (An SD2.x epsilon base gets none: readers take an SD2.x file for v-prediction unless it carries
    SD2-base's `global_step`, which lorasmith's own reader cannot yet read from a .safetensors file.)"""
    import torch

    if scheduler_config.prediction_type != "v_prediction":
        return {}
    keys = {"v_pred": torch.tensor([])}
    if getattr(scheduler_config, "rescale_betas_zero_snr", False):
        keys["ztsnr"] = torch.tensor([])
    return keys


def write_folder(parts, out: Path, metadata: dict[str, str], dtype=None, family=None) -> Path:
    """The merged parts as a diffusers folder, built beside `out` and swapped in whole, with the metadata in
    lorasmith's marker file (which later lets `--overwrite` replace it)."""
    from lorasmith.models.tiny import save_pipeline

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    try:
        for part in (parts.text_encoder, parts.text_encoder_2, parts.vae, parts.unet):
            if part is not None and dtype is not None and part.dtype != dtype:
                part.to(dtype)
        if family is not None and family.denoiser != "unet":  # Flux: the pipeline's own layout
            family.pipeline(parts).save_pretrained(staging)
        else:
            save_pipeline(staging, parts.tokenizer, parts.text_encoder, parts.vae, parts.unet, parts.scheduler,
                          parts.tokenizer_2, parts.text_encoder_2)
        (staging / MARKER).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
