"""The life cycle of a run as named steps: plan → load → cache → set up the network → train → save.

What happens between steps (states, samples, validation, logs, the report) lives in `events.py`.
"""

from __future__ import annotations

import gc
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorasmith.models.base import check_companions, configure_family, inspect_base
from lorasmith.models.families import FAMILIES, family_named
from lorasmith.train.config import Config
from lorasmith.train.conditioning import Conditioner, check_clip_skip
from lorasmith.train.dataset import Dataset, epoch_batches, load_pixels, process_caption
from lorasmith.train.events import NonFiniteLoss, RunEvents
from lorasmith.train.flow_checks import check_flow_preset
from lorasmith.train.latents import LatentCache, cache_latents, latent_key, vae_identity
from lorasmith.train.objective import make_objective
from lorasmith.train.plan import Plan, closes_window
from lorasmith.train.preparation import plan_run, world, write_resolved_config  # noqa: F401  (cli, tests)
from lorasmith.train.previews import Previews
from lorasmith.train.signals import StopSignals
from lorasmith.train.state import Loaded

SAVE_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "float": "float32"}
LOSS_WINDOW = 25
"""Steps in the progress bar's moving average: single-step diffusion losses are very noisy."""


@dataclass
class Result:
    outputs: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    unet: object = None
    text_encoder: object = None
    """The first trained text encoder (None when frozen); all of them in `text_encoders`."""
    text_encoders: list = field(default_factory=list)
    family: object = None
    """The base's family.ModelFamily (names the modules when exporting)."""
    validation: list[float] = field(default_factory=list)
    report: Path | None = None
    states: list[Path] = field(default_factory=list)
    events: dict[str, list[float]] = field(default_factory=dict)
    """Seconds spent on each state save, sampling event, validation and report refresh."""


class Trainer(RunEvents):
    def __init__(self, config: Config, dataset: Dataset, plan: Plan, progress: bool = True, log=print,
                 resume: Loaded | None = None):
        self.config, self.dataset, self.plan = config, dataset, plan
        self.progress, self.log = progress, log
        self.result = Result()
        self.started = time.time()
        self.train_text = config.optimizer.text_encoder_lr > 0
        self.resume = resume
        self.setup_events()

    # -- load and cache: one large part in memory at a time ----------------------------------------------
    def load(self) -> None:
        """The accelerator, the base's family, its tokenizers and noise schedule; the networks come one at a time
        in `cache`."""
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        t = self.config.training
        cuda = torch.cuda.is_available()
        precision = t.mixed_precision
        if not cuda and precision == "fp16":
            self.log("note: fp16 has no effect on CPU (no autocast, no loss scaling); training in fp32")
            precision = "no"
        from lorasmith.train.logs import tensorboard_available

        tracker = "tensorboard" if self.config.output.log_tensorboard and tensorboard_available() else None
        self.accelerator = Accelerator(mixed_precision=precision, cpu=not cuda, log_with=tracker,
                                       project_dir=str(self.paths.logs),
                                       gradient_accumulation_steps=t.gradient_accumulation_steps)
        set_seed(t.seed)
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        family, text_config = inspect_base(self.config.model.pretrained_model)
        self.family = family_named(family)
        check_clip_skip(self.family, text_config, t.clip_skip)
        check_flow_preset(self.family, self.config)
        configure_family(self.family, self.config.model.pretrained_model)
        check_companions(self.config.model.pretrained_model, self.config.model.companions())
        self.loss_band = self.family.healthy_band(text_config)
        parts = self._load(*self.family.tokenizer_parts, "scheduler")
        self.conditioner = Conditioner(self.family, [getattr(parts, name) for name in self.family.tokenizer_parts],
                                       t.clip_skip, self.device, self.weight_dtype,
                                       self.family.text_length(self.config.dataset))
        self.objective, note = make_objective(self.family, parts, self.config.model, t,
                                              Path(self.config.model.pretrained_model.rstrip("/")).name)
        if note and self.accelerator.is_main_process:
            self.log(f"noise schedule: {note}")

    def _load(self, *names: str):
        """Frozen parts on the device in the weight precision (trainable adapters are added later in fp32; a
        family's fp32 VAE stays fp32)."""
        import torch

        from lorasmith.models.base import load_components
        from lorasmith.models.storage import store_in_fp8, to_precision

        parts = load_components(self.config.model.pretrained_model, names, families=FAMILIES,
                                companions=self.config.model.companions())
        for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
            model = getattr(parts, name)
            if model is not None:
                model.requires_grad_(False)
                full = self.weight_dtype == torch.float32 or (name == "vae" and self.family.vae_fp32)
                to_precision(model, self.device, None if full else self.weight_dtype)
                if name != "vae" and self.config.model.base_precision == "fp8":
                    store_in_fp8(model, self.weight_dtype)
        return parts

    def cache(self) -> None:
        """Encode every latent with the VAE, then drop it; embed every caption when the text encoder stays
        frozen, then drop that too. Only then does the UNet load, so the three never share memory."""
        d = self.config.dataset
        self.vae = self._load("vae").vae
        self.vae_id = vae_identity(self.vae)
        folder = Path(d.train_data_dir) / ".latent_cache" if d.cache_latents_to_disk else None
        self.latents = LatentCache(folder)
        if d.cache_latents:
            flips = (False, True) if d.flip_aug else (False,)
            jobs = [(self._key(item, f), item, f) for item in {*self.dataset.items, *self.dataset.reg_items}
                    for f in flips]
            jobs += [(self._key(item, False), item, False) for item in self.dataset.validation]
            jobs.sort(key=lambda job: (str(job[1].image), job[2]))
            with self.writing(folder or Path(d.train_data_dir)):
                cache_latents(jobs, self.vae, self.latents, load_pixels, device=self.device,
                              dtype=next(self.vae.parameters()).dtype,
                              progress=self.progress and self.accelerator.is_main_process)
            if not self.prompts:  # samples decode with the VAE; otherwise it is not needed again
                self.vae = None
            gc.collect()
        parts = self._load(*self.family.text_parts)
        self.conditioner.encoders = [getattr(parts, name) for name in self.family.text_parts]
        if not self.train_text and d.cache_text_encoder_outputs and not d.shuffle_caption:
            everything = [*self.dataset.items, *self.dataset.reg_items, *self.dataset.validation]
            self.conditioner.fill_cache({i.caption for i in everything} | {""} | self.prompt_texts())
        self.previews = Previews(self.accelerator, self.device, self.conditioner, self.objective, self._latents,
                                 self.vae, self.family, self.config.sample.sample_sampler, self.config.training.seed,
                                 self.config.training.train_batch_size)
        gc.collect()
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def load_unet(self) -> None:
        self.unet = self._load("unet").unet
        self.family.configure(self.unet.config)

    def _key(self, item, flip: bool) -> str:
        return latent_key(item.content, item.bucket, flip, self.vae_id)

    # -- network ----------------------------------------------------------------------------------------
    def setup_network(self) -> None:
        import torch

        from lorasmith.train.blocks import plan_blocks
        from lorasmith.train.network import (add_text_lora, add_unet_lora, describe_network, freeze_base,
                                             lora_parameters, network_options, share_fused_downs,
                                             unet_param_groups)
        from lorasmith.train.optim import build_optimizer, build_scheduler

        n, o, t = self.config.network, self.config.optimizer, self.config.training
        # Kohya's block-wise ranks and learning rates (None without block keys); lengths checked for the family
        blocks = plan_blocks(n, self.family.name, getattr(self.unet.config, "layers_per_block", None))
        torch.manual_seed(t.seed)  # the same adapter initialisation on every process
        options = network_options(n)
        add_unet_lora(self.unet, n.network_dim, n.network_alpha, n.network_dropout, n.conv_dim, n.conv_alpha,
                      n.network_target, blocks=blocks, targets=self.family.targets(n.network_target), **options)
        if not n.split_qkv:
            share_fused_downs(self.unet, self.family.fused_parts(self.unet))
        freeze_base(self.unet)
        groups = unet_param_groups(self.unet, o.unet_lr or o.learning_rate, blocks)
        texts = self.trained_texts()
        for index, encoder in enumerate(texts):
            used = self.family.layers_used(index, encoder.config.num_hidden_layers, t.clip_skip)
            add_text_lora(encoder, n.network_dim, n.network_alpha, n.network_dropout, used, **options)
            freeze_base(encoder)
        if texts:
            groups.append({"params": [p for e in texts for p in lora_parameters(e)], "lr": o.text_encoder_lr})
        for group in groups:  # trainable weights stay fp32 whatever the frozen model's precision
            for param in group["params"]:
                param.data = param.data.float()
        self.params = [p for g in groups for p in g["params"]]
        self.ranks = None
        if n.network_module == "dylora":
            from lorasmith.train.dylora import RankSampler

            self.ranks = RankSampler([self.unet, *texts], n.unit)
        if self.accelerator.is_main_process:  # the plan's last line, once the adapters exist to be counted
            print(describe_network(self.unet, texts, self.params, n,
                                   blocks.describe(len(groups) - bool(texts)) if blocks else "",
                                   "UNet" if self.family.denoiser == "unet" else self.family.denoiser), flush=True)
        if t.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for encoder in texts:
                encoder.gradient_checkpointing_enable()
        optimizer = build_optimizer(o.optimizer_type, groups, o.weight_decay)
        # Stepped once per optimizer step, not prepared by accelerate (which would step it once per process).
        self.lr_scheduler = build_scheduler(self.config.schedule.lr_scheduler, optimizer, self.plan.warmup,
                                            self.plan.total_steps, self.config.schedule.lr_scheduler_num_cycles)
        self.unet, *prepared, self.optimizer = self.accelerator.prepare(self.unet, *texts, optimizer)
        if texts:
            self.conditioner.encoders = prepared + self.conditioner.encoders[len(prepared):]
        self.adapted = {"unet": self.unet, **dict(zip(self.family.text_parts, prepared))}

    def trained_texts(self) -> list:
        """The text encoders that take adapters: none when they stay frozen, else the family's share of them."""
        return self.conditioner.encoders[: self.family.texts_trained(self.config.network)] if self.train_text else []

    # -- train ------------------------------------------------------------------------------------------
    def train(self) -> Result:
        """Optimizer steps until the plan's total, from the resumed position if any; between steps, the
        events (states, samples, validation, saves) that events.py defines."""
        import torch
        from tqdm import tqdm

        t = self.config.training
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        self.generator = torch.Generator().manual_seed(t.seed * 7919 + rank)
        self.rng = random.Random(t.seed * 104_729 + rank)
        if self.resume is not None:
            self.restore(self.resume)
        # Modes set here, not inherited: peft's adapter dropouts are created in training mode inside a model
        # loaded in eval mode, so a fresh and a resumed run would otherwise differ in which dropouts are on.
        self.unet.train()
        trained = self.trained_texts()
        for encoder in self.conditioner.encoders:
            encoder.train(any(encoder is e for e in trained))
        bar = tqdm(total=self.plan.total_steps, initial=self.step, desc="train-lora", unit="step", file=sys.stderr,
                   disable=not self.progress or not self.accelerator.is_main_process)
        self.open_log()
        try:
            if self.step == 0:
                self.at_start()
            first_epoch, skip = self.position
            for epoch in range(first_epoch, self.plan.epochs + 1):
                batches = epoch_batches(self.dataset, t.train_batch_size, t.seed, epoch)
                share = -(-len(batches) // processes)
                mine = (batches * 2)[rank : rank + share * processes : processes][:share]
                whole_epoch = True
                for index, batch in enumerate(mine):
                    if epoch == first_epoch and index < skip:
                        continue  # consumed before the state was written
                    loss = self._step(batch, closes_window(index, len(mine), t.gradient_accumulation_steps))
                    if not self.accelerator.sync_gradients:
                        continue
                    self.step += 1
                    self.position = (epoch, index + 1)
                    self.record(epoch, loss)
                    window = self.result.losses[-LOSS_WINDOW:]
                    bar.set_postfix(loss=f"{sum(window) / len(window):.4f}",
                                    lr=f"{self.lr_scheduler.get_last_lr()[0]:.2e}")
                    bar.update(1)
                    self.after_step(epoch)
                    if self.step >= self.plan.total_steps:
                        whole_epoch = index == len(mine) - 1
                        break
                if whole_epoch:  # a run cut by max_train_steps stays mid-epoch, where its position says
                    self.position = (epoch + 1, 0)
                    self.after_epoch(epoch)
                if self.step >= self.plan.total_steps:
                    break
            self.at_end()
        except NonFiniteLoss as exc:
            self.write_report(f"stopped: {exc.short} (nothing from that step was saved)")
            raise
        finally:
            bar.close()
            self.close_log()
        self.result.unet = self.accelerator.unwrap_model(self.unet)
        self.result.family = self.family
        if self.train_text:
            self.result.text_encoders = [self.accelerator.unwrap_model(e) for e in self.trained_texts()]
            self.result.text_encoder = self.result.text_encoders[0]
        return self.result

    def _step(self, batch, closes: bool = True) -> float:
        """One micro-batch; an optimizer step when it `closes` its accumulation window."""
        import torch

        # accelerate counts micro-batches across epochs (it resets only at the end of its own dataloaders,
        # which this loop does not use): its counter is set so that `accumulate` syncs exactly when `closes`.
        # A partial window's gradient is still divided by the full accumulation, as in Kohya's sd-scripts.
        self.accelerator.step = self.accelerator.gradient_accumulation_steps - 1 if closes else 0
        with self.accelerator.accumulate(*self.adapted.values()):
            if self.ranks is not None:  # DyLoRA: this micro-batch's ranks, kept through backward's recompute
                self.ranks.draw(self.generator)
            try:
                loss = self._loss(batch)
                if self.agree(not bool(torch.isfinite(loss.detach()).all())):  # before backward: weights stay good
                    raise NonFiniteLoss(self.step + 1, float(loss.detach()), self.config)
                self.accelerator.backward(loss)
            finally:
                if self.ranks is not None:
                    self.ranks.full()
            if self.accelerator.sync_gradients and self.config.optimizer.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.params, self.config.optimizer.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.accelerator.sync_gradients:
            self.lr_scheduler.step()
        return float(loss.detach())

    def _loss(self, batch):
        import torch

        d = self.config.dataset
        flips = [d.flip_aug and self.rng.random() < 0.5 for _ in batch]
        latents = self._latents(batch, flips)
        captions = [process_caption(i.caption, d.shuffle_caption, d.keep_tokens, d.caption_dropout_rate, self.rng)
                    for i in batch]
        inputs = self.conditioner.unet_inputs(self.conditioner.embed(captions, grad=True), batch, flips)
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device, latents.dtype)
        if self.config.training.noise_offset:
            noise += self.config.training.noise_offset * torch.randn((*latents.shape[:2], 1, 1),
                                                                     generator=self.generator).to(noise)
        steps = self.objective.draw(latents, self.generator)
        loss = self.objective.loss(self.unet, latents, inputs, noise, steps)
        reg = torch.tensor([d.prior_loss_weight if i.is_reg else 1.0 for i in batch], device=loss.device)
        return (loss * reg).mean()

    def _latents(self, batch, flips):
        import torch

        if self.latents is not None and self.config.dataset.cache_latents:
            stacked = torch.stack([self.latents.get(self._key(item, f)) for item, f in zip(batch, flips)])
            return stacked.to(self.device, self.weight_dtype)
        jobs = [(self._key(item, f), item, f) for item, f in zip(batch, flips)]
        scratch = LatentCache()
        cache_latents(jobs, self.vae, scratch, load_pixels, device=self.device,
                      dtype=next(self.vae.parameters()).dtype, progress=False)
        return torch.stack([scratch.get(k) for k, _, _ in jobs]).to(self.device, self.weight_dtype)

    # -- save -------------------------------------------------------------------------------------------
    def save(self, epoch: int, step: int, final: bool) -> Path | None:
        import torch

        from lorasmith.lorafile.export import kohya_state_dict, save_lora
        from lorasmith.lorafile.metadata import kohya_metadata
        from lorasmith.train.state import storage_error

        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        o = self.config.output
        name = f"{o.output_name}.safetensors" if final else f"{o.output_name}-{epoch:06d}.safetensors"
        unet = self.accelerator.unwrap_model(self.unet)
        texts = [self.accelerator.unwrap_model(e) for e in self.trained_texts()] if self.train_text else None
        tensors = kohya_state_dict(unet, texts, getattr(torch, SAVE_DTYPES[o.save_precision]), self.family)
        metadata = kohya_metadata(self.config, self.plan, self.dataset, epoch, step, self.started,
                                  self.objective.prediction, self.run_id, self.family,
                                  self.objective.scheduler.config.get("rescale_betas_zero_snr", False))
        path = Path(o.output_dir) / name
        try:
            save_lora(path, tensors, metadata)
        except OSError as exc:
            raise storage_error(exc, path, self.last_state()) from None
        self.result.outputs.append(path)
        self.history["saves"].append([epoch, step, name])
        return path


def run(config: Config, progress: bool = True, log=print, planned: tuple[Dataset, Plan] | None = None,
        resume: Loaded | None = None) -> tuple[Result, Plan]:
    """The whole run; `planned` is the (dataset, plan) already read for printing, so it is not read twice;
    `resume` a state from `state.load_resume`, already accepted by `check_resume`.

    SIGTERM/SIGINT before training raise signals.Interrupted; during training they end the run with a state
    (events.Preempted); during the final save they wait for it to finish."""
    dataset, plan = planned or plan_run(config)
    trainer = Trainer(config, dataset, plan, progress, log, resume)
    timings = trainer.result.timings
    silent = (lambda message: None) if world()[0] != 0 else None  # one process speaks
    with StopSignals(silent) as trainer.signals:
        trainer.signals.phase = "loading the base model"
        clock = time.perf_counter()
        trainer.load()
        timings["load"] = time.perf_counter() - clock
        if trainer.accelerator.is_main_process:
            trainer.clear_leftovers()
            with trainer.writing(Path(config.output.output_dir)):
                write_resolved_config(config, plan)
        trainer.signals.phase = "caching latents"
        clock = time.perf_counter()
        trainer.cache()
        timings["cache"] = time.perf_counter() - clock
        trainer.signals.phase = "loading the UNet"
        clock = time.perf_counter()
        trainer.load_unet()
        timings["load"] += time.perf_counter() - clock
        trainer.setup_network()
        clock = time.perf_counter()
        with trainer.signals.defer("finishing this step, then saving a state"):
            result = trainer.train()
            timings["train"] = time.perf_counter() - clock
            with trainer.signals.defer("finishing the final save first"):
                trainer.finish()
    return result, plan
