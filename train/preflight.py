"""`train-lora PRESET --preflight`: before renting a GPU, whether the preset fits a card, how long it takes and
what it costs.

Memory is one real optimizer step of the preset on its base's architecture, run on the meta device
(`footprint.py` says how and why), plus what the loop holds beside it: the optimizer's state (from the
trainable tensors' shapes), the text-embedding cache on the card, the VAE when samples are drawn or latents
are not cached, the sampling and latent-encoding passes, and the CUDA context. Time is the step's FLOPs over
the card's dense fp16/bf16 peak (`gpus.py`) at an efficiency fitted to published training speeds, plus a
fixed cost per step, times the plan's steps; latent caching, samples and validation are added the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lorasmith.train.architectures import PreflightError
from lorasmith.train.conditioning import CACHE_BATCH

GIB = 2**30
EFFICIENCY = 0.182
"""Share of the card's dense fp16/bf16 peak a LoRA step reaches, and STEP_OVERHEAD the seconds each optimizer
step costs beside its FLOPs (data, optimizer, launches). Both are fitted, with this module's own FLOP counts,
to two published speeds (bench/preflight_bench.py --calibrate reproduces the fit):
- RTX 4090, SDXL LoRA at 1024², batch 1, bf16, gradient checkpointing, text outputs cached: 1.13-1.21 s/it
  (bmaltais/kohya_ss#1288, user reports, 2023), taken as 1.15 s.
- RTX 3090, SD1.5 LoRA at 512², batch 1, fp16, text encoder trained: ~1.7 it/s (user reports on Kohya's
  trackers), 0.59 s.
Both describe 2023 Kohya on home machines: a tuned Linux box is faster, so these estimates err long."""
STEP_OVERHEAD = 0.443
FLOW_EFFICIENCY = 0.390
"""EFFICIENCY for Flux's transformer, whose large matrix products use the card better than a UNet's convolutions:
fitted, with STEP_OVERHEAD as above, to RTX 4090, Flux.1-dev LoRA at 1024², batch 1, fp8 base, gradient
checkpointing: 4.25 s per step (bghira/SimpleTuner#1184, 2024). One published speed: less certain than the
UNets' fit."""
ALLOCATOR_SLACK = 0.10
"""What PyTorch's caching allocator reserves beyond the bytes allocated (block rounding, fragmentation)."""
CUDA_CONTEXT = 0.5 * GIB
"""The CUDA context, cuBLAS and cuDNN handles: on the card, outside torch.cuda.max_memory_allocated."""
MIN_8BIT_SIZE = 4096
"""bitsandbytes' min_8bit_size: smaller tensors keep 32-bit optimizer state."""
SECOND_ORDER = {"heun", "dpm_2", "dpm_2_a", "k_dpm_2", "k_dpm_2_a"}
"""Samplers that call the UNet twice per step."""


# -- what one step holds --------------------------------------------------------------------------------------
def optimizer_bytes(kind: str, shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """(state kept between steps, temporaries during the step) in bytes for the trainable tensors' shapes.

    AdamW: two fp32 moments (8 B/param) and, on CUDA's foreach path, one fp32 temporary per parameter.
    AdamW8bit: two 8-bit moments with an fp32 absmax per 256-value block (~2.03 B/param) for tensors of 4,096+
    elements; smaller tensors keep 32-bit state (8 B/param). Lion (bitsandbytes, 32-bit): one moment (4 B).
    Prodigy: two moments, s and the initial weights p0 (16 B). Adafactor (no first moment): row and column
    factors for tensors of 2+ dimensions, a full fp32 tensor for the rest; its step builds per-tensor temporaries.
    """
    numel = [math.prod(s) for s in shapes]
    largest = max(numel, default=0) * 4
    if kind == "AdamW":
        return 8 * sum(numel), 4 * sum(numel)
    if kind == "AdamW8bit":
        return sum(2 * n + 8 * math.ceil(n / 256) if n >= MIN_8BIT_SIZE else 8 * n for n in numel), 0
    if kind == "Lion":
        return 4 * sum(numel), 0
    if kind == "Prodigy":
        return 16 * sum(numel), 3 * largest
    if kind == "Adafactor":
        factored = [4 * (math.prod(s[:-1]) + math.prod(s[:-2] + s[-1:])) if len(s) >= 2 else 4 * math.prod(s)
                    for s in shapes]
        return sum(factored), 3 * largest
    raise PreflightError(f"optimizer.optimizer_type = {kind!r} has no memory model in preflight")


@dataclass
class Estimate:
    """Bytes at the peak of a run and the work of its parts, for one preset on one architecture."""

    precision: str
    bucket: tuple[int, int]
    batch: int
    parts: dict[str, int]
    """What stays on the card through a step: weights, adapters, optimizer state, caches, the VAE."""
    transient: dict[str, int]
    """The peak each activity of the training loop adds on top of `parts`: the step, the optimizer's update,
    samples, encoding latents when they are not cached."""
    step_flops: int
    step_ops: int
    steps: int | None
    side_flops: dict[str, int] = field(default_factory=dict)
    """FLOPs of a whole run's latent caching, samples and validation."""
    area_ratio: float = 1.0
    """Mean picture area of the plan's batches over the largest bucket's: scales a step's FLOPs."""
    accumulation: int = 1
    """Micro-batches per optimizer step (gradient accumulation): each costs a forward and backward."""
    before: dict[str, int] = field(default_factory=dict)
    """Peak bytes of the phases before the UNet loads (caching latents: the VAE alone on the card)."""
    breakdown: dict[str, int] = field(default_factory=dict)
    """The training step's peak split into activations and gradients, for the report."""
    notes: list[str] = field(default_factory=list)
    efficiency: float = EFFICIENCY

    @property
    def training(self) -> int:
        return sum(self.parts.values()) + max(self.transient.values())

    @property
    def allocated(self) -> int:
        """Peak bytes allocated: what torch.cuda.max_memory_allocated would report."""
        return max([self.training, *self.before.values()])

    @property
    def on_card(self) -> int:
        """What the card must hold: the allocated peak, the allocator's slack and the CUDA context."""
        return int(self.allocated * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT)

    def fits(self, card) -> bool:
        from lorasmith.train.gpus import USABLE

        return self.on_card <= card.memory_gb * USABLE * GIB

    def seconds_per_step(self, card) -> float:
        """Seconds per optimizer step: each micro-batch's FLOPs at the card's peak × its efficiency, plus
        STEP_OVERHEAD."""
        rate = card.peak(self.precision) * 1e12 * self.efficiency
        return self.accumulation * (self.step_flops * self.area_ratio / rate + STEP_OVERHEAD)

    def side_seconds(self, card) -> dict[str, float]:
        rate = card.peak(self.precision) * 1e12 * self.efficiency
        return {name: flops / rate for name, flops in self.side_flops.items()}

    def hours(self, card) -> float | None:
        if self.steps is None:
            return None
        return (self.steps * self.seconds_per_step(card) + sum(self.side_seconds(card).values())) / 3600


def text_mode(config) -> str:
    """How the trainer treats the text encoders: "trained", "cached" (embedded once, then dropped) or "resident"
    (frozen on the card, encoding every step: caption shuffling, or caching turned off)."""
    if config.optimizer.text_encoder_lr > 0:
        return "trained"
    d = config.dataset
    return "cached" if d.cache_text_encoder_outputs and not d.shuffle_caption else "resident"


def step_setup(config, bucket: tuple[int, int], batch: int, family=None):
    """The step's settings from the preset; `family` (configured for its base) gives the caption length."""
    import torch

    from lorasmith.train.footprint import StepSetup

    t = config.training
    tokens = family.text_length(config.dataset) if family else getattr(config.dataset, "max_token_length", 75)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(t.mixed_precision, torch.float32)
    return StepSetup(bucket, batch, dtype, None if dtype is torch.float32 else dtype, t.gradient_checkpointing,
                     text_mode(config), config.network, t.clip_skip, t.min_snr_gamma,
                     fp8_base=getattr(config.model, "base_precision", "auto") == "fp8",
                     max_tokens=tokens)


def largest_bucket(config, plan) -> tuple[int, int]:
    """The plan's largest bucket with pictures (the step's memory peaks there); the preset's square resolution
    when there is no plan."""
    used = [b for b, n in (plan.buckets.items() if plan else ()) if n]
    if not used:
        return (config.dataset.resolution,) * 2
    return max(used, key=lambda b: (b[0] * b[1], max(b)))


_MEMO: dict = {}


def _memo(function, *args):
    """Simulations are pure functions of the architecture and the setup: each runs once per process."""
    key = (function.__name__, repr(args))
    if key not in _MEMO:
        _MEMO[key] = function(*args)
    return _MEMO[key]


def estimate(config, arch, planned=None) -> Estimate:
    """The preset's peak memory by part and the FLOPs of its step and of its side work; `planned` is
    (dataset, plan) from preparation.plan_run, or None when the dataset cannot be read (per-step figures only)."""
    from lorasmith.models.families import family_named
    from lorasmith.train.footprint import cached_shapes, estimate_step, simulate_text_cache, simulate_vae

    dataset, plan = planned or (None, None)
    t, d = config.training, config.dataset
    bucket = largest_bucket(config, plan)
    family = family_named(arch.family)
    family.configure(arch.unet)
    setup = step_setup(config, bucket, t.train_batch_size, family)
    step = _memo(estimate_step, arch, setup)
    size = setup.weight_dtype.itemsize
    state, temporary = optimizer_bytes(config.optimizer.optimizer_type, step.trainable)
    parts = {"weights": step.frozen, "adapters": step.adapters, "optimizer state": state}
    transient = {"training step": step.peak, "optimizer update": step.grads + temporary}
    breakdown = {"activations": step.peak - step.grads, "gradients": step.grads}
    vae_dtype = setup.weight_dtype if not family.vae_fp32 else _float32()
    images = _images(dataset) * (2 if d.flip_aug else 1) if dataset else None
    est = Estimate(t.mixed_precision, bucket, t.train_batch_size, parts, transient, step.flops, step.ops,
                   plan.total_steps if plan else None, breakdown=breakdown, area_ratio=_area_ratio(plan, bucket),
                   accumulation=t.gradient_accumulation_steps,
                   efficiency=FLOW_EFFICIENCY if family.objective == "flow" else EFFICIENCY)
    if setup.text == "cached":
        captions = _captions(config, dataset)
        per = sum(math.prod(shape) for shape in cached_shapes(arch, setup.max_tokens).values())
        parts["text cache"] = per * size * (captions or 0)
        if captions is None:
            est.notes.append("the text cache is not counted: the dataset could not be read")
        encoding = _memo(simulate_text_cache, arch, setup, min(CACHE_BATCH, captions or CACHE_BATCH))
        est.before["caching captions"] = encoding.resident + encoding.peak + parts["text cache"]
    encode = _memo(simulate_vae, arch, bucket, min(4, images or 4), vae_dtype, False)
    if d.cache_latents:
        est.before["caching latents"] = encode.resident + encode.peak
    else:
        parts["VAE"] = encode.resident
        transient["encoding latents"] = _memo(simulate_vae, arch, bucket, t.train_batch_size, vae_dtype, False).peak
    if images:
        est.side_flops["caching latents"] = int(encode.flops / min(4, images) * images * est.area_ratio)
    prompts = _prompts(config)
    if prompts:
        _add_samples(est, config, arch, setup, prompts, plan, vae_dtype, family)
    if dataset and dataset.validation and plan:
        _add_validation(est, arch, setup, len(dataset.validation), plan)
    return est


def _float32():
    import torch

    return torch.float32


def _images(dataset) -> int:
    return len({*dataset.items, *dataset.reg_items, *dataset.validation})


def _captions(config, dataset) -> int | None:
    if dataset is None:
        return None
    items = [*dataset.items, *dataset.reg_items, *dataset.validation]
    return len({i.caption for i in items} | {""} | {x for p in _prompts(config) for x in (p.prompt, p.negative)})


def _area_ratio(plan, bucket) -> float:
    if not plan or not any(plan.buckets.values()):
        return 1.0
    total = sum(plan.buckets.values())
    return sum(w * h * n for (w, h), n in plan.buckets.items()) / total / (bucket[0] * bucket[1])


def _prompts(config) -> list:
    if not config.sample.sample_prompts:
        return []
    from lorasmith.common.prompts import read_prompts

    try:
        return read_prompts(Path(config.sample.sample_prompts))[0]
    except (OSError, ValueError):
        return []


def _add_samples(est: Estimate, config, arch, setup, prompts, plan, vae_dtype, family) -> None:
    """Samples keep the VAE on the card and add a UNet pass (batch 2 with CFG; Flux, guidance-distilled, has no
    CFG) and a decode at each prompt's size; each sampling event runs every prompt."""
    from lorasmith.train.footprint import estimate_inference, simulate_vae

    flops, peak = 0, 0
    for p in prompts:
        size = (p.width, p.height)
        unet = _memo(estimate_inference, arch, setup, size, 2 if p.scale > 1 and family.objective != "flow" else 1)
        decode = _memo(simulate_vae, arch, size, 1, vae_dtype, True)
        est.parts["VAE"] = decode.resident
        peak = max(peak, unet.peak, decode.peak)
        order = 2 if (p.sampler or config.sample.sample_sampler) in SECOND_ORDER else 1
        flops += p.steps * order * unet.flops + decode.flops
    est.transient["sampling"] = peak
    if plan:
        est.side_flops["samples"] = flops * sample_events(config.sample, plan)


def sample_events(sample, plan) -> int:
    """How many times the run samples: at first, every n epochs or steps, and at the end unless it just did."""
    count = int(sample.sample_at_first)
    ends = False
    if sample.sample_every_n_epochs:
        count += plan.epochs // sample.sample_every_n_epochs
        ends = plan.epochs % sample.sample_every_n_epochs == 0
    if sample.sample_every_n_steps:
        count += plan.total_steps // sample.sample_every_n_steps
        ends = ends or plan.total_steps % sample.sample_every_n_steps == 0
    return count + (0 if ends else 1)


def _add_validation(est: Estimate, arch, setup, held_out: int, plan) -> None:
    """The validation loss: every held-out picture at validation.py's timesteps (in batches of the training
    batch), at the start and after every epoch."""
    from lorasmith.train.footprint import estimate_inference
    from lorasmith.train.validation import TIMESTEPS

    batch = min(len(TIMESTEPS), setup.batch)
    unet = _memo(estimate_inference, arch, setup, setup.bucket, batch)
    est.transient["validation"] = unet.peak
    est.side_flops["validation"] = int(unet.flops / batch * len(TIMESTEPS) * est.area_ratio * held_out *
                                       (plan.epochs + 1))
