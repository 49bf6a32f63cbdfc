"""`--preflight --measure`: ten real steps of the preset through the trainer's own objects, to put the measured
peak memory and speed beside the estimate.

The steps run as `Trainer` runs them (load, cache, UNet, adapters, `_step`) on the pictures of the largest
bucket, in a temporary output folder; samples, validation and saves are left out, and the estimate it is
compared with leaves them out too.
"""

from __future__ import annotations

import copy
import random
import statistics
import tempfile
import time

STEPS = 10
WARMUP = 2
"""Steps left out of the timing: the first ones pay for cuDNN's autotuning and the allocator's growth."""


def training_only(config, output_dir: str):
    """The preset without samples, validation or states, writing into `output_dir`."""
    config = copy.deepcopy(config)
    config.sample.sample_prompts = ""
    config.dataset.validation_split = 0.0
    config.dataset.cache_latents_to_disk = False
    config.output.output_dir = output_dir
    config.output.save_state = False
    config.output.log_tensorboard = False
    return config


def measure_steps(config, dataset, plan, steps: int = STEPS, log=print) -> dict:
    """Peak bytes allocated and seconds per optimizer step over `steps` steps of the largest bucket. On CUDA the
    peak is torch.cuda.max_memory_allocated; elsewhere (tests) a LiveBytes count of the same steps."""
    import torch

    from lorasmith.train.footprint import LiveBytes
    from lorasmith.train.preflight import largest_bucket
    from lorasmith.train.trainer import Trainer

    bucket = largest_bucket(config, plan)
    pictures = [item for item in dataset.items if item.bucket == bucket] or dataset.items
    batch = config.training.train_batch_size
    subset = copy.copy(dataset)
    subset.items, subset.reg_items, subset.validation = pictures[: batch * steps], [], []
    trainer = Trainer(config, subset, plan, progress=False, log=log)
    trainer.load()
    trainer.cache()
    trainer.load_unet()
    trainer.setup_network()
    trainer.generator = torch.Generator().manual_seed(config.training.seed)
    trainer.rng = random.Random(config.training.seed)
    trainer.unet.train()
    cuda = trainer.device.type == "cuda"
    live = None if cuda else LiveBytes()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        for model in [trainer.unet, *trainer.conditioner.encoders]:
            live.track(*model.parameters(), *model.buffers())
        live.track(*[t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)])
        live.__enter__()
    times = []
    try:
        for index in range(steps):
            items = (pictures * steps)[index * batch : (index + 1) * batch]
            started = time.perf_counter()
            trainer._step(items)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    finally:
        if live is not None:
            live.__exit__(None, None, None)
    peak = torch.cuda.max_memory_allocated() if cuda else live.peak
    reserved = torch.cuda.max_memory_reserved() if cuda else None
    timed = times[WARMUP:] if len(times) > WARMUP else times
    return {"peak": peak, "reserved": reserved, "seconds": statistics.median(timed), "bucket": bucket,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def compare(config, arch, planned, log) -> list[str]:
    """The measured figures beside the estimate of the same training-only preset."""
    from lorasmith.train.dataset import DatasetError
    from lorasmith.train.gpus import CARDS
    from lorasmith.train.preflight import ALLOCATOR_SLACK, GIB, estimate
    from lorasmith.train.preparation import plan_run

    with tempfile.TemporaryDirectory(prefix="lorasmith-measure-") as folder:
        plain = training_only(config, folder)
        try:
            dataset, plan = plan_run(plain)
        except DatasetError as exc:
            return [f"measure: the dataset cannot be read ({exc}); nothing measured"]
        measured = measure_steps(plain, dataset, plan, log=log)
    est = estimate(plain, arch, (dataset, plan))
    card = next((c for c in CARDS if c.name.lower().replace(" ", "") in measured["device"].lower().replace(" ", "")),
                None)
    lines = [f"measured on {measured['device']}, {STEPS} steps at {measured['bucket'][0]}×{measured['bucket'][1]} "
             "(no samples, validation or saves):",
             f"  peak allocated {measured['peak'] / GIB:.2f} GiB (estimate {est.training / GIB:.2f} GiB, "
             f"{(est.training / measured['peak'] - 1) * 100:+.0f} %)"]
    if measured["reserved"] is not None:
        lines.append(f"  peak reserved {measured['reserved'] / GIB:.2f} GiB (estimate with the allocator's slack "
                     f"{est.training * (1 + ALLOCATOR_SLACK) / GIB:.2f} GiB)")
    speed = f"  {measured['seconds']:.3f} s/step"
    if card is not None:
        speed += f" (estimate for {card.name} {est.seconds_per_step(card):.3f} s/step)"
    return lines + [speed]
