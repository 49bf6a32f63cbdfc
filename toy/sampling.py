"""Sample the toy model the way a user would (diffusers' pipeline, a LoRA file through `load_lora_weights`)
and score the pictures with `toy.scores`."""

from __future__ import annotations

import statistics
from pathlib import Path

from toy import scores, world


def pipeline(model: Path, lora: Path | None = None, weight: float = 1.0):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="lora")
        pipe.set_adapters(["lora"], adapter_weights=[weight])
    return pipe


def prompts(style: bool) -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for every colour × shape, with or without the trigger phrase."""
    return [(world.caption(c, s, style), c, s) for c in world.COLOURS for s in world.SHAPES]


def sample(pipe, style: bool, seeds, steps: int = 25, cfg: float = 7.5, prefix: str = ""):
    """One picture per prompt and seed (`prefix` put in front of each prompt); each seed's noise comes from
    its own CPU generator."""
    import torch

    out = []
    for seed in seeds:
        batch = prompts(style)
        generators = [torch.Generator("cpu").manual_seed(1000 * seed + i) for i in range(len(batch))]
        with torch.no_grad():
            images = pipe([prefix + p for p, _, _ in batch], num_inference_steps=steps, guidance_scale=cfg,
                          height=world.SIZE, width=world.SIZE, generator=generators).images
        out += [(image, colour, shape, seed) for image, (_, colour, shape) in zip(images, batch)]
    return out


def summarise(samples) -> dict:
    """Content accuracy, mean style, and the sd of the style means of the groups named by each sample's last
    field (a sampling seed, or a (training run, seed) pair)."""
    styles = [scores.style_score(image) for image, *_ in samples]
    per_seed = {}
    for (image, *_, seed), value in zip(samples, styles):
        per_seed.setdefault(seed, []).append(value)
    seed_means = [statistics.fmean(v) for v in per_seed.values()]
    return {"samples": len(samples),
            "content_accuracy": scores.content_accuracy([(im, c, s) for im, c, s, _ in samples]),
            "style_mean": statistics.fmean(styles),
            "style_sd_over_seeds": statistics.stdev(seed_means) if len(seed_means) > 1 else 0.0}


def contact_sheet(samples, columns: int = 12) -> "object":
    from PIL import Image

    size = world.SIZE
    rows = (len(samples) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * size, rows * size), "white")
    for i, (image, *_) in enumerate(samples):
        sheet.paste(image, (i % columns * size, i // columns * size))
    return sheet
