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
from lorasmith.models.family import is_v2
from lorasmith.lorafile.read import Lora, kohya_tensors
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
        "ss_network_module": "networks.lora",
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


def merge_checkpoint(model: str, loras: list[tuple[Lora, float]], out: Path, fmt: str, dtype=None) -> tuple[Path, int]:
    """The base model with every LoRA added at its weight, as one original-layout `.safetensors` file
    (A1111, ComfyUI) or a diffusers folder; (path, layers changed). All files are checked before any write."""
    from lorasmith.models.base import load_components, quiet_libraries, resolve_name
    from lorasmith.models.tiny import save_pipeline
    from lorasmith.use.apply import merge_into

    quiet_libraries()
    parts = load_components(resolve_name(model)[0])
    changed = merge_into({"unet": parts.unet, "text_encoder": parts.text_encoder}, loras)
    family = family_named("sd2" if is_v2(parts.text_encoder.config) else "sd1").architecture(
        parts.scheduler.config.prediction_type)[1]
    metadata = {"lorasmith_base_model": model_name(model), "lorasmith_merged_loras": inputs_metadata(loras),
                "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": family.removesuffix("/lora"),
                "modelspec.prediction_type": parts.scheduler.config.prediction_type, "modelspec.title": out.stem}
    if fmt == "diffusers":
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
        try:
            for part in (parts.text_encoder, parts.vae, parts.unet):
                if dtype is not None and part.dtype != dtype:
                    part.to(dtype)
            save_pipeline(staging, parts.tokenizer, parts.text_encoder, parts.vae, parts.unet, parts.scheduler)
            (staging / MARKER).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
            swap_in(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return out, changed
    from lorasmith.models.checkpoint import original_state_dict, save_checkpoint

    state = original_state_dict(parts.unet, parts.vae, parts.text_encoder)
    return save_checkpoint(out, state, metadata, dtype), changed
