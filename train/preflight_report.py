"""What `train-lora PRESET --preflight` prints: one line per card, or one card in detail; when the preset does not
fit, the cheapest changes that make it fit, each re-estimated."""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

from lorasmith.models.families import family_named
from lorasmith.train.flow_checks import check_flow_preset
from lorasmith.train.preflight import GIB, Estimate, estimate, text_mode


@dataclass
class Fix:
    change: str
    cost: str
    """What the change costs in speed or quality."""
    estimate: Estimate
    """The estimate with this change and every one before it in the list."""


def _set(**changes):
    """A change to a config: `section__key=value` pairs."""

    def apply(config):
        for name, value in changes.items():
            section, key = name.split("__")
            setattr(getattr(config, section), key, value)

    return apply


def _batch_one(config):
    t = config.training
    t.gradient_accumulation_steps *= t.train_batch_size
    t.train_batch_size = 1


def _lower_resolution(config):
    d = config.dataset
    d.resolution = max(256, round(d.resolution * 0.75 / 64) * 64)
    d.max_bucket_reso = max(d.resolution, min(d.max_bucket_reso, d.resolution * 2))
    d.min_bucket_reso = min(d.min_bucket_reso, d.resolution)


def _caching_peaks(config, est: Estimate) -> bool:
    return config.dataset.cache_latents and est.before.get("caching latents", 0) >= est.training


CHANGES = (
    ("cache the text encoders' outputs", "no speed cost (a little faster); caption shuffling is turned off",
     lambda c, e: text_mode(c) == "resident",
     _set(dataset__cache_text_encoder_outputs=True, dataset__shuffle_caption=False)),
    ('optimizer_type = "AdamW8bit"', "no speed or quality cost worth noting on CUDA",
     lambda c, e: c.optimizer.optimizer_type in ("AdamW", "Lion", "Prodigy"),
     _set(optimizer__optimizer_type="AdamW8bit")),
    ("gradient checkpointing", "slower: the forward pass runs again during backward",
     lambda c, e: not c.training.gradient_checkpointing, _set(training__gradient_checkpointing=True)),
    ("batch 1 with gradient accumulation", "the same effective batch, slower per picture",
     lambda c, e: c.training.train_batch_size > 1, _batch_one),
    ("latents encoded at each step (cache_latents = false)",
     "slower: the VAE encodes every step, one batch at a time, instead of 4 pictures at a time once",
     _caching_peaks, _set(dataset__cache_latents=False)),
    ('fp8 base weights (model.base_precision = "fp8")', "a little slower; a slight quality cost",
     lambda c, e: getattr(c.model, "base_precision", "fp8") != "fp8", _set(model__base_precision="fp8")),
    ("freeze the text encoders and cache their outputs", "the text encoder no longer learns the trigger",
     lambda c, e: text_mode(c) == "trained",
     _set(optimizer__text_encoder_lr=0.0, dataset__cache_text_encoder_outputs=True, dataset__shuffle_caption=False)),
    ("a lower resolution", "less detail in what the LoRA learns", lambda c, e: c.dataset.resolution > 256,
     _lower_resolution),
)
"""Ways to need less memory, cheapest first (what they cost in speed, then in quality)."""


def fixes(config, arch, planned, current: Estimate, replan) -> list[Fix]:
    """The changes of CHANGES, cheapest first, each applied on top of the ones before it and re-estimated; a fix
    is listed when the peak drops, so each listed estimate is smaller than the one before. A change that lowers
    the training phase while another phase is the peak (caching latents, say) is kept and listed together with
    the change that then lowers the peak ("batch 1 + latents encoded at each step"); one that lowers nothing is
    left out. `replan(config)` gives the (dataset, plan) of a changed preset, or None."""
    found, pending, peak = [], [], current.allocated
    for label, cost, applies, apply in CHANGES:
        if not applies(config, current):
            continue
        candidate = copy.deepcopy(config)
        apply(candidate)
        if apply is _lower_resolution:
            label = f"{label} ({config.dataset.resolution} → {candidate.dataset.resolution})"
        new = estimate(candidate, arch, replan(candidate))
        if new.allocated > current.allocated or (new.allocated == current.allocated
                                                 and new.training >= current.training):
            continue
        config, current = candidate, new
        pending.append((label, cost))
        if new.allocated < peak:
            found.append(Fix(" + ".join(p[0] for p in pending), "; ".join(p[1] for p in pending), new))
            pending, peak = [], new.allocated
    return found


def gib(value: int) -> str:
    """GiB, with two decimals below 10 (a LoRA's adapters are tenths of a GiB)."""
    return f"{value / GIB:.2f}" if value < 10 * GIB else f"{value / GIB:.1f}"


def _time(est: Estimate, card, price: float | None) -> str:
    hours = est.hours(card)
    text = f"{est.seconds_per_step(card):.2f} s/step"
    if hours is not None:
        text += f", {hours:.1f} h"
        if price:
            text += f", ${hours * price:.2f}"
    return text


def card_line(est: Estimate, card, price: float | None, found: list[Fix]) -> str:
    """One line: the card, whether the preset fits, its speed, hours and cost; the first fixes that fit when not."""
    from lorasmith.train.gpus import USABLE

    head = f"{card.name:<10} {card.memory_gb:>4g} GB  "
    usable = card.memory_gb * USABLE * GIB
    slow = ("  (no bf16 on this card: fp32 speed; fp16 runs at its tensor-core rate)"
            if est.precision == "bf16" and card.bf16_tflops is None else "")
    if est.fits(card):
        return f"{head}fits ({gib(est.on_card)} of {gib(usable)} GiB)  {_time(est, card, price)}{slow}"
    need = f"{head}does not fit (needs {gib(est.on_card)} of {gib(usable)} GiB)"
    for i, fix in enumerate(found):
        if fix.estimate.fits(card):
            changes = " + ".join(f.change for f in found[: i + 1])
            return f"{need}; fits with {changes}: {gib(fix.estimate.on_card)} GiB, {_time(fix.estimate, card, price)}"
    return f"{need}; no change listed makes it fit"


def summary(config, arch, est: Estimate) -> list[str]:
    """What was estimated and the peak: the training phase by part, the phases before it, the step's work."""
    from lorasmith.train.preflight import ALLOCATOR_SLACK, CUDA_CONTEXT

    t, n = config.training, config.network
    text = {"trained": "text encoders trained", "cached": "text outputs cached",
            "resident": "text encoders frozen on the card"}[text_mode(config)]
    w, h = est.bucket
    lines = [f"preflight: {family_named(arch.family).label} from {arch.source}",
             f"  {w}×{h} (the largest bucket), batch {est.batch}, "
             f"{'fp32' if t.mixed_precision == 'no' else t.mixed_precision}, gradient checkpointing "
             f"{'on' if t.gradient_checkpointing else 'off'}, {text}, {config.optimizer.optimizer_type}, "
             f"{n.network_module} rank {n.network_dim}"]
    phase = max(est.transient, key=est.transient.get)
    parts = " + ".join(f"{k} {gib(v)}" for k, v in est.parts.items() if v)
    step = (" + ".join(f"{k} {gib(v)}" for k, v in est.breakdown.items()) if phase == "training step"
            else f"{phase} {gib(est.transient[phase])}")
    lines.append(f"  training: {gib(est.training)} GiB allocated = {parts} + {step}")
    lines += [f"  {name} (before the {denoiser(arch)} loads): {gib(value)} GiB allocated"
              for name, value in est.before.items()]
    lines.append(f"  peak {gib(est.allocated)} GiB allocated; on the card, with the allocator's slack "
                 f"(+{ALLOCATOR_SLACK:.0%}) and the CUDA context ({CUDA_CONTEXT / GIB:g} GiB): {gib(est.on_card)} GiB")
    steps = f"{est.steps:,} steps" if est.steps is not None else "steps unknown (no plan)"
    lines.append(f"  one step: {est.step_flops / 1e12:.2f} TFLOP at the largest bucket; {steps}")
    return lines + [f"  note: {note}" for note in est.notes]


def denoiser(arch) -> str:
    word = family_named(arch.family).denoiser
    return "UNet" if word == "unet" else word


def detail(est: Estimate, card, price: float | None, found: list[Fix], arch) -> list[str]:
    """The named card in full: the breakdown, the phases, the time by part, and every fix re-estimated."""
    lines = [card_line(est, card, price, found), "  memory (GiB):"]
    for name, value in {**est.parts, **est.breakdown}.items():
        lines.append(f"    {name:<20} {gib(value):>6}")
    for name, value in est.transient.items():
        if name != "training step":
            lines.append(f"    {'peak of ' + name:<20} {gib(value):>6}  (instead of the training step's)")
    for name, value in est.before.items():
        lines.append(f"    {name:<20} {gib(value):>6}  (before the {denoiser(arch)} loads)")
    seconds = est.side_seconds(card)
    if est.steps is not None:
        lines.append(f"  time: {est.steps} steps × {est.seconds_per_step(card):.2f} s"
                     + "".join(f" + {name} {s / 60:.1f} min" for name, s in seconds.items()))
    for fix in found:
        mark = "fits" if fix.estimate.fits(card) else "still too big"
        lines.append(f"  with {fix.change}: {gib(fix.estimate.on_card)} GiB, {mark}, "
                     f"{_time(fix.estimate, card, price)} ({fix.cost})")
    return lines


def run_preflight(args, log=lambda m: print(m, file=sys.stderr)) -> int:
    """The --preflight command: 0 when estimated (with --gpu: 0 fits, 1 does not), 2 when it cannot estimate."""
    from lorasmith.models.base import resolve_name
    from lorasmith.train.config import load_config
    from lorasmith.train.dataset import DatasetError
    from lorasmith.train.gpus import CARDS, find_card
    from lorasmith.train.architectures import resolve_arch
    from lorasmith.train.preparation import plan_run

    card = find_card(args.gpu) if args.gpu else None
    if args.measure:
        import torch

        if not torch.cuda.is_available():
            print("train-lora: --measure runs 10 real steps on a CUDA GPU and this machine has none "
                  "(torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
    config = load_config(args.preset, args.overrides)
    config.model.pretrained_model = resolve_name(config.model.pretrained_model)[0]
    arch = resolve_arch(config.model.pretrained_model, args.family)
    check_flow_preset(family_named(arch.family), config)

    def replan(changed):
        try:
            return plan_run(changed)
        except (DatasetError, OSError):
            return None

    planned = replan(config)
    est = estimate(config, arch, planned)
    if planned is None:
        est.notes.append(f"the dataset {config.dataset.train_data_dir} cannot be read here: per-step figures only")
    cards = [card] if card else list(CARDS)
    found = fixes(config, arch, planned, est, replan) if not all(est.fits(c) for c in cards) else []
    print("\n".join(summary(config, arch, est)))
    if card:
        print("\n".join(detail(est, card, args.price_per_hour, found, arch)))
    else:
        print("\n".join(card_line(est, c, args.price_per_hour, found) for c in CARDS))
    if args.measure:
        from lorasmith.train.preflight_measure import compare

        print("\n".join(compare(config, arch, planned, log)))
    return 0 if card is None or est.fits(card) else 1
