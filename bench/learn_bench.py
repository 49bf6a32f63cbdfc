"""Does train-lora teach a base model a style it has never seen, as well as a plain diffusers + peft loop?

The base is the toy model in toy/base (64-px flat coloured shapes, trained from scratch by toy/build.py).
The style is clay shading (toy/world.py), which the base never drew. The bench draws `--pictures` clay
pictures with sidecar captions ("a red circle"), runs them through the real `prep-images` and
`caption-folder --prefix-only` (which puts the trigger "claymation style" in front), and trains:

- train-lora, with a preset written here;
- a reference loop: diffusers' train_text_to_image_lora.py reduced to its loop (peft adapters on the same
  attention projections, AdamW, the same cosine schedule and warmup, epsilon target, uniform timesteps),
  saved with diffusers' own `save_lora_weights`;

at the same steps, rank, alpha, learning rate, batch size and seed, the text encoder frozen in both. Each
LoRA is then loaded the way a user would (diffusers' `load_lora_weights`) and sampled for every colour ×
shape prompt, with and without the trigger, for fixed seeds. Scores (toy/scores.py): style strength (the
clay shading; training pictures about 1, the base about 0) and content accuracy (the prompted colour and
shape drawn).

    .venv/bin/python bench/learn_bench.py [--steps 400] [--pictures 24] [--seeds 4] [--keep DIR]

Goal: train-lora's style score ≥ the reference's; content accuracy with the trigger within 5 points of the
base model's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from measure import measure  # noqa: E402

BIN = Path(sys.executable).parent
BASE = ROOT / "toy" / "base"
TRIGGER = "claymation style"


def draw_raw(folder: Path, count: int, seed: int) -> None:
    from toy import world

    folder.mkdir(parents=True)
    for i, (image, scene) in enumerate(world.pictures(seed, count, style=True)):
        image.save(folder / f"clay_{i:02d}.png")
        (folder / f"clay_{i:02d}.txt").write_text(scene.caption + "\n", encoding="utf-8")


def write_preset(path: Path, data: Path, out: Path, args, seed: int) -> Path:
    path.write_text(f"""config_version = 1
[model]
pretrained_model = "{BASE}"
[dataset]
train_data_dir = "{data}"
resolution = 64
min_bucket_reso = 64
max_bucket_reso = 64
bucket_reso_steps = 64
[network]
network_dim = {args.rank}
network_alpha = {args.rank}
[optimizer]
optimizer_type = "AdamW"
learning_rate = {args.lr}
text_encoder_lr = {args.te_lr}
[schedule]
lr_scheduler = "cosine"
lr_warmup_steps = {WARMUP}
[training]
max_train_steps = {args.steps}
train_batch_size = {args.batch}
seed = {seed}
[output]
output_dir = "{out}"
output_name = "ours"
save_state = false
log_tensorboard = false
""", encoding="utf-8")
    return path


WARMUP = 0.05


def reference(data: str, out: str, steps: int, rank: int, lr: float, batch: int, seed: int) -> None:
    """diffusers' LoRA example reduced to its loop, on the pictures and captions prep and caption-folder wrote."""
    import random

    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = str(BASE)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=int(WARMUP * steps), num_training_steps=steps)
    images = sorted(p for p in Path(data).glob("*/*.png"))
    start = time.perf_counter()
    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype="float32"))
                              .permute(2, 0, 1) / 127.5 - 1 for p in images])
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer([p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images],
                        padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        context = text_encoder(ids)[0]
    order: list[int] = []
    unet.train()
    for _ in range(steps):
        if len(order) < batch:
            order += rng.sample(range(len(images)), len(images))
        index, order = order[:batch], order[batch:]
        clean = latents[index]
        noise = torch.randn_like(clean)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),))
        noisy = scheduler.add_noise(clean, noise, t)
        loss = F.mse_loss(unet(noisy, t, context[index]).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    train_seconds = time.perf_counter() - start
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)), safe_serialization=True)
    print(f"TRAIN_SECONDS {train_seconds:.2f}")


def evaluate(loras: list[Path | None], seeds) -> dict[bool, tuple[float, float, float, list]]:
    """style mean, its sd over (training run, sampling seed) groups, content accuracy and the samples, with
    (True) and without (False) the trigger phrase, over every LoRA in `loras` (one per training seed)."""
    from toy.sampling import pipeline, sample, summarise

    pipes = [pipeline(BASE, lora) for lora in loras]
    result = {}
    for style in (True, False):
        flat = [(im, c, s, (run, seed)) for run, pipe in enumerate(pipes)
                for im, c, s, seed in sample(pipe, style, seeds)]
        summary = summarise(flat)
        result[style] = (summary["style_mean"], summary["style_sd_over_seeds"], summary["content_accuracy"], flat)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps for both trainers (default 400)")
    parser.add_argument("--pictures", type=int, default=24, help="clay training pictures (default 24)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank, alpha equal to it (default 8)")
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate (default 5e-4)")
    parser.add_argument("--te-lr", type=float, default=0.0,
                        help="text encoder learning rate of train-lora; 0 freezes it, as in the reference (default 0)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--seed", type=int, default=42, help="first training seed of both trainers (default 42)")
    parser.add_argument("--runs", type=int, default=2,
                        help="training runs per trainer, seeds --seed, --seed + 1, ... (default 2)")
    parser.add_argument("--seeds", type=int, default=4, help="sampling seeds per prompt and LoRA (default 4)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (sample sheets, LoRAs)")
    parser.add_argument("--child-reference", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_reference:
        reference(*args.child_reference, args.steps, args.rank, args.lr, args.batch, args.seed)
        return
    from lorasmith.models.base import quiet_libraries
    from toy import scores, world
    from toy.sampling import contact_sheet

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        timings: dict[str, list[float]] = {}
        start = time.perf_counter()
        draw_raw(root / "raw", args.pictures, seed=7)
        timings["draw pictures"] = [time.perf_counter() - start]
        data = root / "data"
        timings["prep-images"] = [measure([str(BIN / "prep-images"), str(root / "raw"), "--out", str(data),
                                           "--name", TRIGGER, "--min-side", "64", "--max-side", "64"])[0]]
        timings["caption-folder"] = [measure([str(BIN / "caption-folder"), str(data), "--prefix", TRIGGER,
                                              "--prefix-only"])[0]]
        ours, refs = [], []
        for run in range(args.runs):  # interleaved: one run of each trainer per seed
            seed = args.seed + run
            preset = write_preset(root / f"ours-{seed}.toml", data, root / f"ours-{seed}", args, seed)
            timings.setdefault("train-lora (whole job)", []).append(
                measure([str(BIN / "train-lora"), str(preset), "--quiet"])[0])
            ours.append(root / f"ours-{seed}" / "ours.safetensors")
            (root / f"ref-{seed}").mkdir(exist_ok=True)
            command = [sys.executable, __file__, "--child-reference", str(data), str(root / f"ref-{seed}"),
                       "--steps", str(args.steps), "--rank", str(args.rank), "--lr", str(args.lr),
                       "--batch", str(args.batch), "--seed", str(seed)]
            wall, _, out = measure(command)
            timings.setdefault("reference (whole job)", []).append(wall)
            timings.setdefault("reference (loop only)", []).append(float(out.split("TRAIN_SECONDS ")[1].split()[0]))
            refs.append(root / f"ref-{seed}" / "pytorch_lora_weights.safetensors")
        seeds = range(args.seeds)
        results = {}
        for label, loras in (("base model", [None]), ("train-lora", ours), ("reference", refs)):
            start = time.perf_counter()
            results[label] = evaluate(loras, seeds)
            timings[f"sampling + scoring, {label}"] = [time.perf_counter() - start]
            if args.keep:
                contact_sheet(results[label][True][3]).save(root / f"samples-{label.replace(' ', '-')}.png")
        training = [scores.style_score(im) for im, _ in world.pictures(7, args.pictures, style=True)]
    print(f"\n{args.pictures} clay pictures, {args.steps} steps, rank {args.rank} (alpha {args.rank}), lr {args.lr}, "
          f"batch {args.batch}, {args.runs} training run(s) per trainer (seeds {args.seed}…), {len(seeds)} sampling "
          "seeds × 12 prompts per LoRA")
    print(f"{'':34s} {'style (mean ± sd over seeds)':>30s} {'content accuracy':>17s}")
    print(f"{'training pictures':34s} {statistics.fmean(training):20.3f} ± {statistics.stdev(training):5.3f} "
          f"{100.0:15.1f} %")
    for label, result in results.items():
        for style in (True, False):
            mean, sd, accuracy, _ = result[style]
            name = f"{label}, {'trigger' if style else 'plain'} prompt"
            print(f"{name:34s} {mean:20.3f} ± {sd:5.3f} {100 * accuracy:15.1f} %")
    print("wall time (median per run): " + ", ".join(f"{k} {statistics.median(v):.1f} s" for k, v in timings.items()))
    ours_style, ref_style = results["train-lora"][True][0], results["reference"][True][0]
    base_plain = results["base model"][False][2]
    kept = 100 * (results["train-lora"][True][2] - base_plain)
    print(f"summary: train-lora style {ours_style:.3f} vs reference {ref_style:.3f} "
          f"({'≥, goal met' if ours_style >= ref_style else 'below the reference'}); content accuracy with the "
          f"trigger {100 * results['train-lora'][True][2]:.1f} % vs the base model's {100 * base_plain:.1f} % "
          f"({kept:+.1f} points; {'within 5, goal met' if kept >= -5 else 'more than 5 points lost'})")


if __name__ == "__main__":
    main()
