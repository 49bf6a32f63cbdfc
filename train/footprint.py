"""One training step of a preset on its base model's architecture, run on PyTorch's meta device: the bytes it
holds at its peak and the FLOPs it does, with no GPU and no weights.

How, and why this way (each alternative was tried on a CPU-only torch build):

- The UNet, text encoders and VAE are built from their configs on the meta device, cast (and stored in fp8 for
  model.base_precision = "fp8") as the trainer loads them, and the adapters are added by `train/network.py`
  exactly as the trainer adds them. A meta tensor has a shape and a dtype and no storage: the full SDXL UNet
  costs nothing to build. The step is the trainer's (`Objective.loss`, then backward), under
  `meta_device.Autocast` (CUDA's autocast lists, fused attention) and counted by `meta_device.LiveBytes`.
- `FakeTensorMode` with device "cuda" cannot be used: a CPU-only build refuses it ("PyTorch is not linked with
  support for cuda devices"). With device "cpu" it works, but an SDXL step took ~40 s on two cores and it
  applies CPU's autocast lists, not CUDA's. `torch.distributed._tools.mem_tracker.MemTracker` works under
  FakeTensorMode, so it costs the same, and it is a private API that needs torch.distributed. Plain meta
  tensors with our own dispatch mode take ~15 s for SDXL's step on two cores; a memo of meta ops' output shapes
  (`meta_device._run_meta`) brings that to ~10 s, and `by_depth` to ~5 s: SDXL's ten identical transformer
  blocks per level are simulated as one and two, and extrapolated (the same peak and FLOPs as the full step).
- What a meta step cannot know is added by preflight.py: the optimizer's state (from the trainable tensors'
  shapes), caches, the CUDA context and the caching allocator's slack.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field, replace

import torch

from lorasmith.train.meta_device import Autocast, LiveBytes, checkpointing, meta_build


@dataclass
class Part:
    """What a model built for the step holds, in bytes, before the step."""

    model: object
    frozen: int = 0
    adapters: int = 0
    trainable: list = field(default_factory=list)
    """The shape of each trainable tensor (an optimizer's state is per tensor)."""


def cast_base(model, weight_dtype, fp8: bool = False) -> None:
    """The trainer's `_load`: the frozen model in `weight_dtype`, then (fp8) its Linear/conv weights stored in
    fp8 and cast up as each layer reads them (models/storage.py)."""
    from lorasmith.models.storage import store_in_fp8, to_precision

    model.requires_grad_(False)
    if weight_dtype != torch.float32:
        to_precision(model, dtype=weight_dtype)
    if fp8:
        store_in_fp8(model, weight_dtype)


def describe(model) -> Part:
    """Trainable tensors (the adapters) cast to fp32, as the trainer casts them; the bytes of each kind."""
    part = Part(model)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.requires_grad:
            tensor.data = tensor.data.float()
            part.adapters += tensor.numel() * 4
            part.trainable.append(tuple(tensor.shape))
        else:
            part.frozen += tensor.numel() * tensor.element_size()
    return part


@dataclass
class Arch:
    """A base model's architecture: the family and each part's config, from a folder, a file or the public table."""

    family: str
    unet: dict
    texts: list
    """transformers CLIPTextConfig per text encoder, in the family's order."""
    vae: dict
    source: str


@dataclass
class StepSetup:
    """What shapes one optimizer step's memory: the preset's settings, the bucket and the precision."""

    bucket: tuple[int, int]
    """(width, height) in pixels."""
    batch: int
    weight_dtype: torch.dtype
    amp: torch.dtype | None
    checkpointing: bool
    text: str
    """"trained" (adapters, gradients), "resident" (frozen, encoded every step) or "cached"."""
    network: object
    clip_skip: int = 1
    min_snr_gamma: float = 0.0
    autocast_device: str = "cuda"
    fp8_base: bool = False
    max_tokens: int = 75
    """dataset.max_token_length: 150 and 225 read captions in chunks of 75 (a longer context)."""


@dataclass
class StepCost:
    resident: int
    """Bytes held before the step: frozen weights, buffers and adapters of the parts on the card."""
    frozen: int
    adapters: int
    trainable: list
    peak: int
    """Bytes above `resident` at the step's peak (activations, their gradients, adapter gradients so far)."""
    grads: int
    flops: int
    ops: int


def build_unet(arch: Arch, device: str = "meta"):
    """The denoiser: SD's UNet, or Flux's transformer."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    if _flow(arch):
        return _build(device, FluxTransformer2DModel.from_config, arch.unet)
    return _build(device, UNet2DConditionModel.from_config, {"in_channels": 4, "out_channels": 4, **arch.unet})


def build_texts(arch: Arch, device: str = "meta") -> list:
    """The family's text encoders: SDXL's second is the projection model, whose pooled output the UNet takes;
    Flux's second is T5's encoder."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def kind(index, config):
        if isinstance(config, T5Config):
            return T5EncoderModel
        return CLIPTextModelWithProjection if arch.family == "sdxl" and index == 1 else CLIPTextModel

    return [_build(device, kind(i, c), c) for i, c in enumerate(arch.texts)]


def _flow(arch: Arch) -> bool:
    return arch.family == "flux"


def latent_channels(arch: Arch) -> int:
    return arch.vae.get("latent_channels", 4)


def cached_shapes(arch: Arch, tokens: int) -> dict[str, tuple[int, ...]]:
    """The shape of one caption's cached conditioning by name, as the family's `encode` gives it: `tokens` is
    Flux's T5 length, or SD's max_token_length (read in chunks of 75 between start and end tokens)."""
    if _flow(arch):
        return {"context": (tokens, arch.texts[1].d_model), "pooled": (arch.texts[0].hidden_size,)}
    width = sum(c.hidden_size for c in arch.texts) if arch.family == "sdxl" else arch.texts[0].hidden_size
    shapes = {"context": (75 * (tokens // 75) + 2, width)}
    if arch.family == "sdxl":
        shapes["pooled"] = (arch.texts[-1].projection_dim,)
    return shapes


def build_vae(arch: Arch, device: str = "meta"):
    from diffusers import AutoencoderKL

    return _build(device, AutoencoderKL.from_config, arch.vae)


def _build(device: str, function, *args, **kwargs):
    """`function(...)` on meta (`meta_build`) or, for the bench's real steps, as it is."""
    return meta_build(lambda: function(*args, **kwargs)) if device == "meta" else function(*args, **kwargs)


class _Ids:
    """A stand-in tokenizer for the family's own `encode`: random token ids, 77 positions a chunk."""

    model_max_length, bos_token_id, eos_token_id, pad_token_id = 77, 0, 1, 1

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, captions, max_length: int = 77, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=torch.randint(2, self.vocab, (len(captions), max_length)))


def _adapted(arch: Arch, setup: StepSetup, device: str):
    """The family, the UNet and the text encoders the step needs, loaded and adapted as the trainer does it."""
    from lorasmith.models.families import family_named
    from lorasmith.train.blocks import plan_blocks
    from lorasmith.train.network import (add_text_lora, add_unet_lora, freeze_base, network_options,
                                         share_fused_downs)

    n, family = setup.network, family_named(arch.family)
    family.configure(arch.unet)
    options = network_options(n)
    unet = build_unet(arch, device)
    texts = build_texts(arch, device) if setup.text != "cached" else []
    for model in [unet, *texts]:
        cast_base(model, setup.weight_dtype, setup.fp8_base)
    blocks = plan_blocks(n, arch.family, arch.unet.get("layers_per_block", 2))
    _build(device, add_unet_lora, unet, n.network_dim, n.network_alpha, n.network_dropout, n.conv_dim, n.conv_alpha,
           n.network_target, blocks=blocks, targets=family.targets(n.network_target), **options)
    if not n.split_qkv:
        share_fused_downs(unet, family.fused_parts(unet))
    freeze_base(unet)
    for index, encoder in enumerate(texts[: family.texts_trained(n)] if setup.text == "trained" else []):
        used = family.layers_used(index, encoder.config.num_hidden_layers, setup.clip_skip)
        _build(device, add_text_lora, encoder, n.network_dim, n.network_alpha, n.network_dropout, used, **options)
        freeze_base(encoder)
    return family, unet, texts


def estimate_step(arch: Arch, setup: StepSetup) -> StepCost:
    """`simulate_step` on meta, made fast for deep UNets by `by_depth`."""
    return by_depth(arch, lambda reduced: simulate_step(reduced, setup))


def estimate_inference(arch: Arch, setup: StepSetup, size: tuple[int, int], batch: int) -> StepCost:
    """`simulate_inference` on meta, made fast for deep UNets by `by_depth`."""
    return by_depth(arch, lambda reduced: simulate_inference(reduced, setup, size, batch))


def by_depth(arch: Arch, run) -> StepCost:
    """`run(arch)` for a denoiser that stacks more than 2 identical blocks (SDXL's 10 transformer blocks per level,
    Flux's 19 double and 38 single blocks): run with 1 and with 2 blocks in each such stack, and every count (bytes
    held, peak bytes, FLOPs, ops, gradients, the trainable tensors) extrapolated linearly to the real depth.
    Identical blocks add identical amounts, so this is exact (bench/preflight_bench.py --depth checks it on SDXL:
    the same bytes, peak and FLOPs), in a fraction of the time."""
    depths, at_depths = _stacks(arch)
    deep = {axis: depth for axis, depth in depths.items() if depth > 2}
    if not deep:
        return run(arch)

    def at(changes: dict) -> StepCost:
        return run(at_depths({axis: changes.get(axis, 1 if axis in deep else d) for axis, d in depths.items()}))

    base = at({})
    total = {key: getattr(base, key) for key in ("resident", "frozen", "adapters", "peak", "grads", "flops", "ops")}
    trainable = Counter(base.trainable)
    for axis, depth in deep.items():
        one_more = at({axis: 2})
        for key in total:
            total[key] += (getattr(one_more, key) - getattr(base, key)) * (depth - 1)
        for shape, count in (Counter(one_more.trainable) - Counter(base.trainable)).items():
            trainable[shape] += count * (depth - 1)
    return StepCost(**total, trainable=sorted(trainable.elements()))


def _stacks(arch: Arch):
    """({stack: depth}, arch at other depths): Flux's two block stacks, or a UNet's transformer depth per level
    (none where the config's depths are not plain counts)."""
    if _flow(arch):
        keys = ("num_layers", "num_single_layers")
        return {k: arch.unet[k] for k in keys}, lambda depths: replace(arch, unet={**arch.unet, **depths})
    depths = arch.unet.get("transformer_layers_per_block", 1)
    levels = len(arch.unet.get("down_block_types", ()))
    depths = list(depths) if isinstance(depths, (list, tuple)) else [depths] * levels
    if arch.unet.get("reverse_transformer_layers_per_block") or not all(isinstance(d, int) for d in depths):
        return {}, None
    return dict(enumerate(depths)), lambda changed: replace(
        arch, unet={**arch.unet, "transformer_layers_per_block": [changed[i] for i in range(len(depths))]})


def simulate_inference(arch: Arch, setup: StepSetup, size: tuple[int, int], batch: int) -> StepCost:
    """One UNet forward without gradients (a sampling step with CFG is batch 2; validation is batch 5), with the
    adapters in place; `peak` is what it adds to what the model holds."""
    family, unet, _ = _adapted(arch, replace(setup, text="cached"), "meta")
    part = describe(unet)
    unet.eval()
    live = LiveBytes()
    live.track(*unet.parameters(), *unet.buffers())
    resident = live.now
    width, height = size
    with live, _amp(setup, False), torch.no_grad():
        latents = torch.randn(batch, latent_channels(arch), height // 8, width // 8, device="meta")
        latents = latents.to(setup.weight_dtype)
        cond = _conditioning(arch, family, [], replace(setup, batch=batch), "meta")
        inputs = family.unet_inputs(cond, [(height, width, 0, 0, height, width)] * batch)
        if family.objective == "flow" and family.guided:
            inputs["guidance"] = torch.ones(batch, device="meta", dtype=setup.weight_dtype)
        family.predict(unet, latents, torch.randint(0, 1000, (batch,), device="meta"), inputs)
    return StepCost(resident, part.frozen, part.adapters, part.trainable, live.peak - resident, 0, live.flops,
                    live.ops)


def simulate_vae(arch: Arch, size: tuple[int, int], batch: int, dtype, decode: bool, amp=None) -> StepCost:
    """The VAE encoding pictures (latent caching) or decoding latents (samples) on meta, without gradients:
    `resident` its weights, `peak` what the pass adds."""
    vae = build_vae(arch)
    cast_base(vae, dtype)
    part = describe(vae)
    live = LiveBytes()
    live.track(*vae.parameters(), *vae.buffers())
    resident = live.now
    width, height = size
    with live, Autocast(amp), torch.no_grad():
        if decode:
            vae.decode(torch.randn(batch, latent_channels(arch), height // 8, width // 8, device="meta").to(dtype))
        else:
            vae.encode(torch.randn(batch, 3, height, width, device="meta").to(dtype)).latent_dist.mode()
    return StepCost(resident, part.frozen, 0, [], live.peak - resident, 0, live.flops, live.ops)


def simulate_text_cache(arch: Arch, setup: StepSetup, batch: int) -> StepCost:
    """The frozen text encoders embedding a batch of captions for the cache (Flux's T5-XXL is 4.7 B parameters):
    `resident` their weights, `peak` what the pass adds."""
    from lorasmith.models.families import family_named

    texts = build_texts(arch)
    for encoder in texts:
        cast_base(encoder, setup.weight_dtype, setup.fp8_base)
        encoder.eval()
    frozen = sum(describe(encoder).frozen for encoder in texts)
    live = LiveBytes()
    live.track(*[t for encoder in texts for t in [*encoder.parameters(), *encoder.buffers()]])
    resident = live.now
    with live, _amp(setup, False):
        _conditioning(arch, family_named(arch.family), texts, replace(setup, batch=batch, text="cached"), "meta")
    return StepCost(resident, frozen, 0, [], live.peak - resident, 0, live.flops, live.ops)


def simulate_step(arch: Arch, setup: StepSetup, device: str = "meta", real_autocast: bool = False,
                  before_step=None) -> StepCost:
    """One optimizer step as the trainer takes it (Trainer._loss, then backward), on `device`: "meta" for the
    estimate, "cpu" with real tensors for the bench; `real_autocast` uses torch.autocast instead of `Autocast`;
    `before_step()` is called once the model is built, just before the step (the bench resets its RSS peak)."""
    family, unet, texts = _adapted(arch, setup, device)
    trained = texts[: family.texts_trained(setup.network)] if setup.text == "trained" else []
    parts = [describe(model) for model in [unet, *texts]]
    amp = _amp(setup, real_autocast)
    if setup.checkpointing:
        # torch's checkpoint restores torch.autocast by itself; the emulation must be entered again
        run, kwargs = checkpointing(contextlib.nullcontext if real_autocast else lambda: _amp(setup, False))
        unet.enable_gradient_checkpointing(run)
        for encoder in trained:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    unet.train()
    for encoder in texts:
        encoder.train(encoder in trained)
    live = LiveBytes()
    for part in parts:
        live.track(*part.model.parameters(), *part.model.buffers())
    resident = live.now
    width, height = setup.bucket
    if before_step is not None:
        before_step()
    with live, amp:
        shape = (setup.batch, latent_channels(arch), height // 8, width // 8)
        latents = torch.randn(shape, device=device).to(setup.weight_dtype)
        noise = torch.randn(shape, device=device).to(setup.weight_dtype)
        steps = torch.randint(0, 1000, (setup.batch,), device=device)
        cond = _conditioning(arch, family, texts, setup, device)
        inputs = family.unet_inputs(cond, [(height, width, 0, 0, height, width)] * setup.batch)
        loss = _objective(family, setup).loss(unet, latents, inputs, noise, steps).mean()
        loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for part in parts for p in part.model.parameters()
                if p.grad is not None)
    return StepCost(resident, sum(p.frozen for p in parts), sum(p.adapters for p in parts),
                    [shape for p in parts for shape in p.trainable], live.peak - resident, grads, live.flops, live.ops)


def _amp(setup: StepSetup, real_autocast: bool):
    if real_autocast:
        return torch.autocast(setup.autocast_device, dtype=setup.amp, enabled=setup.amp is not None)
    return Autocast(setup.amp, setup.autocast_device)


def _conditioning(arch: Arch, family, texts: list, setup: StepSetup, device: str) -> dict:
    """The UNet's conditioning: from the text encoders (with gradients when they train), or as the cache holds it
    (the encoders' output dtype, the weight dtype)."""
    captions = ["a caption"] * setup.batch
    if texts:
        tokenizers = [_Ids(config.vocab_size) for config in arch.texts]
        with torch.enable_grad() if setup.text == "trained" else torch.no_grad():
            return family.encode(tokenizers, texts, captions, setup.clip_skip, setup.max_tokens)
    return {name: torch.randn(setup.batch, *shape, device=device).to(setup.weight_dtype)
            for name, shape in cached_shapes(arch, setup.max_tokens).items()}


def _objective(family, setup: StepSetup):
    """The trainer's objective for the family: flow matching (its default sampling), or SD's ε-prediction."""
    if family.objective == "flow":
        from lorasmith.models.flux_parts import scheduler_for
        from lorasmith.train.flow import FlowObjective
        from lorasmith.train.schema import TrainingConfig

        return FlowObjective(scheduler_for(family.guided), family, TrainingConfig())
    from lorasmith.models.from_file import sd_scheduler
    from lorasmith.train.objective import Objective

    return Objective(sd_scheduler(), setup.min_snr_gamma)
