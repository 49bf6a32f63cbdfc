"""The metadata Kohya's trainer writes (`ss_*`) and the Stability model spec (`modelspec.*`).

UIs read them to show what a LoRA was trained on and with what settings; ss_tag_frequency feeds the tag
lists A1111 and Forge show beside a LoRA.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from pathlib import Path

from lorasmith.common.captions import tokens

NETWORK_MODULE = "networks.lora"
DYLORA_MODULE = "networks.dylora"


def tag_frequency(items) -> dict[str, dict[str, int]]:
    """Per dataset folder, how many captions hold each token (Kohya's ss_tag_frequency)."""
    freq: dict[str, Counter] = {}
    for item in items:
        freq.setdefault(item.image.parent.name, Counter()).update(set(tokens(item.caption)))
    return {folder: dict(counter) for folder, counter in freq.items()}


def model_name(name: str) -> str:
    """The base model as a shared file may name it: a local path by its base name alone (an absolute path
    would publish the user's folders), a hub id as it is. Kohya does the same."""
    path = Path(name)
    return path.name if path.is_absolute() or path.exists() else name


def bucket_info(plan, dataset) -> dict:
    """Kohya's ss_bucket_info: per bucket its resolution and pictures per epoch (repeats included), and the
    mean gap between each picture's aspect ratio and its bucket's (without repeats)."""
    errors = [abs(i.bucket[0] / i.bucket[1] - i.size[0] / i.size[1]) for i in dataset.items if i.size]
    buckets = {str(n): {"resolution": list(size), "count": count}
               for n, (size, count) in enumerate(sorted(plan.buckets.items()))}
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0}


def network_module(module: str) -> str:
    """Kohya's ss_network_module: the module `--network_module` names for this type."""
    return {"loha": "lycoris.kohya", "lokr": "lycoris.kohya", "dylora": DYLORA_MODULE}.get(module, NETWORK_MODULE)


def network_arguments(n) -> dict[str, str]:
    """Kohya's ss_network_args: the options `--network_args` would pass, as strings (LyCORIS' `algo=loha`)."""
    args = {}
    if n.network_module in ("loha", "lokr"):
        args["algo"] = n.network_module
    conv_dim, conv_alpha = (n.conv_dim, n.conv_alpha) if n.conv_dim or n.network_module != "locon" else (
        n.network_dim, n.network_alpha)
    if conv_dim:
        args.update(conv_dim=str(conv_dim), conv_alpha=str(conv_alpha))
    if n.network_module in ("loha", "lokr"):
        args.update(rank_dropout=str(n.rank_dropout), module_dropout=str(n.module_dropout),
                    use_tucker=str(n.use_tucker))
    if n.network_module == "lokr":
        args["factor"] = str(n.factor)
    if n.network_module == "dylora":
        args["unit"] = str(n.unit)
    if n.network_target != "kohya":
        args["network_target"] = n.network_target
    for key in ("split_qkv", "train_t5xxl"):  # Flux's, written only when set, as Kohya's --network_args
        if getattr(n, key):
            args[key] = "True"
    args.update(block_arguments(n))
    return args


BLOCK_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_dims", "block_alphas", "conv_block_dims",
              "conv_block_alphas")


def block_arguments(n) -> dict[str, str]:
    """The block-wise keys that are set, as Kohya's `--network_args` spell them: comma-separated numbers
    (`block_dims=2,4,…`) or a curve name (`down_lr_weight=sine+.5`), and block_lr_zero_threshold when set."""
    args = {}
    for key in BLOCK_ARGS:
        value = getattr(n, key, None)
        if value:
            args[key] = value if isinstance(value, str) else ",".join(format(v, "g") for v in value)
    if getattr(n, "block_lr_zero_threshold", 0):
        args["block_lr_zero_threshold"] = format(n.block_lr_zero_threshold, "g")
    return args


def _dirs(items, folders: dict[str, int]) -> dict:
    return {name: {"n_repeats": repeats, "img_count": sum(1 for i in items if i.image.parent.name == name)}
            for name, repeats in folders.items()}


def kohya_metadata(config, plan, dataset, epoch: int, step: int, started: float, prediction_type: str,
                   session: str | None = None, family=None, zero_terminal_snr: bool = False) -> dict[str, str]:
    """Every value names files by base name only, so the file can be shared as it is. `family` is the base's
    ModelFamily (SD1.x when None); `zero_terminal_snr` is the schedule the run resolved, not the preset's "auto"."""
    from lorasmith.models.families import family_named

    family = family or family_named("sd1")
    version, spec = family.architecture(prediction_type)
    n, o, t, opt, d = config.network, config.output, config.training, config.optimizer, config.dataset
    network_args = network_arguments(n)
    reg_folders = {i.image.parent.name: i.repeats for i in dataset.reg_items}
    trigger = o.trigger_phrase or next(iter(dataset.folders), "").split("_", 1)[-1]
    res = f"{d.resolution}x{d.resolution}"
    extra = {"modelspec.encoder_layer": str(t.clip_skip)} if t.clip_skip > 1 else {}
    return {
        "ss_session_id": str(int(session, 16)) if session else str(uuid.uuid4().int % 2**32),
        "ss_training_started_at": f"{started:.0f}",
        "ss_training_finished_at": f"{time.time():.0f}",
        "ss_output_name": o.output_name,
        "ss_sd_model_name": model_name(config.model.pretrained_model),
        "ss_base_model_version": version,
        "ss_v2": str(family.name == "sd2"),
        "ss_network_module": network_module(n.network_module),
        "ss_network_dim": n.network_dim,
        "ss_network_alpha": n.network_alpha,
        "ss_network_dropout": n.network_dropout,
        "ss_network_args": json.dumps(network_args),
        "ss_resolution": f"({d.resolution}, {d.resolution})",
        "ss_num_train_images": plan.image_views,
        "ss_num_reg_images": dataset and len(dataset.reg_items),
        "ss_num_batches_per_epoch": plan.batches_per_epoch,
        "ss_num_epochs": plan.epochs,
        "ss_epoch": epoch,
        "ss_steps": step,
        "ss_max_train_steps": plan.total_steps,
        "ss_batch_size_per_device": t.train_batch_size,
        "ss_total_batch_size": t.train_batch_size * plan.processes * t.gradient_accumulation_steps,
        "ss_gradient_accumulation_steps": t.gradient_accumulation_steps,
        "ss_learning_rate": opt.learning_rate,
        "ss_unet_lr": opt.unet_lr or opt.learning_rate,
        "ss_text_encoder_lr": opt.text_encoder_lr,
        "ss_optimizer": opt.optimizer_type,
        "ss_lr_scheduler": config.schedule.lr_scheduler,
        "ss_lr_warmup_steps": plan.warmup,
        "ss_max_grad_norm": opt.max_grad_norm,
        "ss_clip_skip": t.clip_skip,
        "ss_mixed_precision": t.mixed_precision,
        "ss_seed": t.seed,
        "ss_noise_offset": t.noise_offset,
        "ss_min_snr_gamma": t.min_snr_gamma,
        "ss_prior_loss_weight": d.prior_loss_weight,
        "ss_caption_dropout_rate": d.caption_dropout_rate,
        "ss_shuffle_caption": d.shuffle_caption,
        "ss_keep_tokens": d.keep_tokens,
        "ss_flip_aug": d.flip_aug,
        "ss_cache_latents": d.cache_latents,
        "ss_enable_bucket": "True",
        "ss_bucket_no_upscale": "False",
        "ss_min_bucket_reso": d.min_bucket_reso,
        "ss_max_bucket_reso": d.max_bucket_reso,
        "ss_bucket_info": json.dumps(bucket_info(plan, dataset)),
        "ss_num_validation_images": len(dataset.validation),
        "ss_validation_split": d.validation_split,
        "ss_gradient_checkpointing": t.gradient_checkpointing,
        "ss_color_aug": "False",
        "ss_random_crop": "False",
        "ss_full_fp16": "False",
        "ss_zero_terminal_snr": str(bool(zero_terminal_snr)),
        "ss_max_token_length": d.max_token_length,
        "ss_loss_type": "l2",
        "ss_dataset_dirs": json.dumps(_dirs(dataset.items, dataset.folders)),
        "ss_reg_dataset_dirs": json.dumps(_dirs(dataset.reg_items, reg_folders)),
        "ss_tag_frequency": json.dumps(tag_frequency(dataset.items)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": spec,
        "modelspec.implementation": "diffusers",
        "modelspec.title": o.output_name if epoch >= plan.epochs else f"{o.output_name}-{epoch:06d}",
        "modelspec.resolution": res,
        "modelspec.prediction_type": prediction_type,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.trigger_phrase": trigger,
        **extra,
        **family.metadata(config),
    }
