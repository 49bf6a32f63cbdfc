"""Generation parameters in the PNG's `parameters` text chunk, as A1111 writes them, so A1111's PNG Info,
civitai and ComfyUI's importers read how a picture was made.

Layout: the prompt (with `<lora:NAME:W>` tags), then `Negative prompt: …`, then one line of `Key: value`
pairs; values holding commas are quoted.
"""

from __future__ import annotations

from pathlib import Path

from lorasmith.common.files import atomic_writer

A1111_SAMPLERS = {
    "ddim": "DDIM", "pndm": "PLMS", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a", "dpmsolver": "DPM2", "dpmsolver++": "DPM++ 2M", "dpmsingle": "DPM++ 2S a", "ddpm": "DDPM",
    "k_euler": "Euler", "k_euler_a": "Euler a", "k_dpm_2": "DPM2", "k_dpm_2_a": "DPM2 a",
}


def _value(value) -> str:
    text = str(value)
    return f'"{text}"' if ("," in text or ":" in text) and not text.startswith('"') else text


def weight_text(weight: float) -> str:
    return f"{weight:g}"


def parameters_text(prompt: str, negative: str, settings: dict, loras: list[tuple[str, float, str]]) -> str:
    """The chunk's text. `settings` in order (Steps, Sampler, CFG scale, Seed, Size, …); `loras` as
    (name, weight, short hash) — the tags go into the prompt and the hashes into `Lora hashes`, as A1111 does."""
    tags = " ".join(f"<lora:{name}:{weight_text(weight)}>" for name, weight, _ in loras)
    lines = [" ".join(p for p in (prompt, tags) if p)]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    pairs = dict(settings)
    hashes = [f"{name}: {short}" for name, _, short in loras if short]
    if hashes:
        pairs["Lora hashes"] = ", ".join(hashes)
    lines.append(", ".join(f"{key}: {_value(value)}" for key, value in pairs.items() if value not in (None, "")))
    return "\n".join(lines)


def save_png(path: Path, image, parameters: str) -> Path:
    """The picture with its parameters, under a temporary name until complete."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    with atomic_writer(path) as handle:
        image.save(handle, format="PNG", pnginfo=info)
    return path
