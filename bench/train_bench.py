"""train-lora against a plain diffusers + peft loop (the way diffusers' LoRA example trains), same data.

(a) the tiny model, (b) a random-weight model with the exact SD1.5 architecture (860 M UNet parameters),
both built from configs (no download); 256 px, batch 1, rank 16, AdamW, frozen text encoder, latents
cached by both. Reported: seconds per optimizer step (training phase only), peak RSS of the whole
process, and the whole job's wall time (start to saved file). Rounds interleave, medians are reported.

    .venv/bin/python bench/train_bench.py [--rounds 2] [--steps 6] [--skip-sd15]

--types compares the network types on the SD1.5-architecture model instead (lora, locon, loha, lokr, dylora;
rank 16, conv rank 16 for locon/loha/lokr, DyLoRA unit 4; --modules picks some): trainable parameters, file size, s/step and peak RSS.

--sdxl measures (c) instead: a random-weight model with SDXL base's exact architecture (2.6 G UNet
parameters, both text encoders) at 512 px, batch 1, rank 16, gradient checkpointing in both contenders (the
reference loop is diffusers' train_text_to_image_lora_sdxl.py reduced the same way: both encoders run every
step, as there).

--flux measures Flux.1 instead: (d) the tiny Flux (two double and two single blocks, 32 wide) and (e) a
reduced-depth full-width Flux (models/tiny_flux.py `flux-1x2`: one double and two single blocks at Flux.1-dev's
width 3072, 0.65 G transformer parameters) at 128 px, batch 1, rank 16 on Kohya's Flux module set, T5 read to 128
tokens, text outputs cached by both, against diffusers' train_dreambooth_lora_flux.py reduced to its loop with
the same modules (its --lora_layers, an adapter per q, k, v: train-lora's split_qkv = true) and its defaults
otherwise (uniform σ, guidance 3.5 input); "train-lora unsplit" is the default split_qkv = false beside them.

--overhead measures what the batch-job features cost instead: the same run plain (no states, samples or
validation) and as a batch job (a state every 2 steps, 2 sampling events of one 256×256 prompt at 8
steps, a held-out picture), interleaved; then a resume from the last state. Reported: seconds per state
save and load, a state's size on disk, seconds per sampling event, and their share of the training phase.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import measure  # noqa: E402

BIN = Path(sys.executable).parent
RANK, SIZE, XL_SIZE, FLUX_SIZE, FLUX_TOKENS = 16, 256, 512, 128, 128


def make_data(root: Path, count: int = 6, size: int = SIZE) -> Path:
    from PIL import Image, ImageDraw

    folder = root / "1_bench"
    folder.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", (size, size), (40 * i % 256, 120, 200))
        ImageDraw.Draw(image).ellipse((10 * i, 30, 10 * i + 120, 150), fill=(220, 90, 40))
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"claymation style, blob {i}", encoding="utf-8")
    return root


def write_preset(path: Path, model: Path, data: Path, out: Path, steps: int, checkpointing: bool = False,
                 size: int = SIZE, extra: dict[str, str] | None = None) -> Path:
    """`extra`: lines added under a section header, e.g. {"training": 'guidance_scale = 3.5'}."""
    text = f"""config_version = 1
[model]
pretrained_model = "{model}"
[dataset]
train_data_dir = "{data}"
resolution = {size}
min_bucket_reso = {min(size, 256)}
[network]
network_dim = {RANK}
network_alpha = {RANK}
[optimizer]
optimizer_type = "AdamW"
[training]
max_train_steps = {steps}
train_batch_size = 1
gradient_checkpointing = {str(checkpointing).lower()}
[output]
output_dir = "{out}"
output_name = "bench"
"""
    for section, lines in (extra or {}).items():
        text = text.replace(f"[{section}]\n", f"[{section}]\n{lines}\n")
    path.write_text(text, encoding="utf-8")
    return path


def reference(model: str, data: str, steps: int) -> None:
    """diffusers' train_text_to_image_lora.py, reduced to its loop; latents precomputed as a fair baseline."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=steps)
    images = sorted(Path(data, "1_bench").glob("*.png"))
    latents, captions = [], []
    with torch.no_grad():
        for path in images:
            pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype="float32"))
            pixels = pixels.permute(2, 0, 1)[None] / 127.5 - 1
            latents.append(vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor)
            captions.append(path.with_suffix(".txt").read_text())
    unet.train()
    start = time.perf_counter()
    for step in range(steps):
        i = step % len(latents)
        noise = torch.randn_like(latents[i])
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,))
        noisy = scheduler.add_noise(latents[i], noise, t)
        ids = tokenizer([captions[i]], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        context = text_encoder(ids)[0]
        loss = F.mse_loss(unet(noisy, t, context).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    print(f"STEP_SECONDS {(time.perf_counter() - start) / steps:.4f}")


def reference_xl(model: str, data: str, steps: int, checkpointing: bool) -> None:
    """diffusers' train_text_to_image_lora_sdxl.py reduced to its loop: both text encoders encode the caption at
    every step, time ids from the picture's size (uncropped), latents precomputed as a fair baseline."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")]
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for m in (unet, vae, *encoders):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=steps)
    images = sorted(Path(data, "1_bench").glob("*.png"))
    latents, captions, sizes = [], [], []
    with torch.no_grad():
        for path in images:
            picture = Image.open(path).convert("RGB")
            pixels = torch.from_numpy(np.asarray(picture, dtype="float32")).permute(2, 0, 1)[None] / 127.5 - 1
            latents.append(vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor)
            captions.append(path.with_suffix(".txt").read_text())
            sizes.append((picture.height, picture.width))
    unet.train()
    start = time.perf_counter()
    for step in range(steps):
        i = step % len(latents)
        noise = torch.randn_like(latents[i])
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,))
        noisy = scheduler.add_noise(latents[i], noise, t)
        with torch.no_grad():
            states = []
            for tokenizer, encoder in zip(tokenizers, encoders):
                ids = tokenizer([captions[i]], padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids
                out = encoder(ids, output_hidden_states=True)
                pooled = out[0]
                states.append(out.hidden_states[-2])
        time_ids = torch.tensor([[*sizes[i], 0, 0, *sizes[i]]], dtype=torch.float32)
        prediction = unet(noisy, t, torch.cat(states, dim=-1),
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    print(f"STEP_SECONDS {(time.perf_counter() - start) / steps:.4f}")


def reference_flux(model: str, data: str, steps: int) -> None:
    """diffusers' train_dreambooth_lora_flux.py reduced to its loop: σ drawn uniformly from the scheduler's
    timesteps (weighting_scheme "none"), latents shifted and scaled, packed into 2×2 patches, guidance 3.5 for
    dev, velocity target; prompt embeddings computed once per caption, as its cached-embeddings path does."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from peft import LoraConfig
    from PIL import Image

    from lorasmith.models.family_flux import TARGETS

    torch.manual_seed(0)
    pipe = FluxPipeline.from_pretrained(model, transformer=None, vae=None)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    for m in (transformer, vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                       target_modules=f"^{TARGETS['kohya']}$"))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=steps)
    images = sorted(Path(data, "1_bench").glob("*.png"))
    latents, prompts = [], []
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    with torch.no_grad():
        for path in images:
            pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype="float32"))
            pixels = pixels.permute(2, 0, 1)[None] / 127.5 - 1
            latents.append((vae.encode(pixels).latent_dist.sample() - shift) * scale)
            embeds, pooled, text_ids = pipe.encode_prompt(path.with_suffix(".txt").read_text(), None,
                                                          max_sequence_length=FLUX_TOKENS)
            prompts.append((embeds, pooled, text_ids))
    transformer.train()
    start = time.perf_counter()
    for step in range(steps):
        i = step % len(latents)
        x = latents[i]
        b, c, h, w = x.shape
        noise = torch.randn_like(x)
        u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=b)
        timesteps = scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()]
        sigmas = scheduler.sigmas[[(scheduler.timesteps == t).nonzero().item() for t in timesteps]].view(-1, 1, 1, 1)
        noisy = (1 - sigmas) * x + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        guidance = torch.full((b,), 3.5) if transformer.config.guidance_embeds else None
        embeds, pooled, text_ids = prompts[i]
        prediction = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                 pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                 img_ids=image_ids, return_dict=False)[0]
        prediction = FluxPipeline._unpack_latents(prediction, h * 8, w * 8, 8)
        loss = ((prediction.float() - (noise - x).float()) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    print(f"STEP_SECONDS {(time.perf_counter() - start) / steps:.4f}")


def ours_step_seconds(stdout: str, steps: int) -> float:
    match = re.search(r"train ([\d.]+) s", stdout)
    return float(match.group(1)) / steps if match else float("nan")


def bench(name: str, model: Path, root: Path, rounds: int, steps: int, checkpointing: bool) -> None:
    data = root / "data"
    if name in ("tiny-flux", "flux-1x2"):
        extra = {"dataset": f"t5xxl_max_token_length = {FLUX_TOKENS}",  # the reference's settings
                 "training": 'guidance_scale = 3.5\ntimestep_sampling = "uniform"',
                 "network": "split_qkv = true"}  # an adapter per q, k, v, as the reference's peft config
        preset = write_preset(root / f"{name}.toml", model, data, root / "out", steps, False, FLUX_SIZE, extra)
        unsplit = write_preset(root / f"{name}-unsplit.toml", model, data, root / "out", steps, False, FLUX_SIZE,
                               {**extra, "network": "split_qkv = false"})
        contenders = {"train-lora": [str(BIN / "train-lora"), str(preset), "--quiet"],
                      "train-lora unsplit": [str(BIN / "train-lora"), str(unsplit), "--quiet"],
                      "reference loop": [sys.executable, __file__, "--child-reference-flux", str(model), str(data),
                                         str(steps)]}
        return compare(name, contenders, rounds, steps)
    if name == "sdxl":  # gradient checkpointing in both: without it SDXL's activations at 512 px crowd 24 GiB
        preset = write_preset(root / f"{name}.toml", model, data, root / "out", steps, True, XL_SIZE)
        contenders = {"train-lora +GC": [str(BIN / "train-lora"), str(preset), "--quiet"],
                      "reference +GC": [sys.executable, __file__, "--child-reference-xl", str(model), str(data),
                                        str(steps)]}
        return compare(name, contenders, rounds, steps)
    preset = write_preset(root / f"{name}.toml", model, data, root / "out", steps)
    contenders = {
        "train-lora": [str(BIN / "train-lora"), str(preset), "--quiet"],
        **({"train-lora +GC": [str(BIN / "train-lora"), str(write_preset(root / f"{name}-gc.toml", model, data,
                                                                          root / "out", steps, True)), "--quiet"]}
           if checkpointing else {}),
        "reference loop": [sys.executable, __file__, "--child-reference", str(model), str(data), str(steps)],
    }
    compare(name, contenders, rounds, steps)


def compare(name: str, contenders: dict[str, list[str]], rounds: int, steps: int) -> None:
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in contenders}
    for r in range(rounds):
        for label, command in contenders.items():
            wall, peak, out = measure(command)
            per_step = ours_step_seconds(out, steps) if label.startswith("train-lora") else float(
                re.search(r"STEP_SECONDS ([\d.]+)", out).group(1))
            results[label].append((per_step, peak, wall))
            print(f"  {name} round {r + 1}: {label}: {per_step:.3f} s/step, peak RSS {peak:.0f} MiB, "
                  f"whole job {wall:.1f} s", flush=True)
    print(f"{name} medians:")
    for label, runs in results.items():
        med = [statistics.median(x[i] for x in runs) for i in range(3)]
        print(f"  {label:18s} {med[0]:7.3f} s/step   peak RSS {med[1]:7.0f} MiB   whole job {med[2]:6.1f} s")


TYPES = ("lora", "locon", "loha", "lokr", "dylora")


def types(model: Path, root: Path, rounds: int, steps: int, modules=TYPES) -> None:
    """Each network type on the same target set (Kohya's), interleaved, against plain LoRA."""
    data = root / "data"
    contenders = {}
    for module in ("lora", *[m for m in modules if m != "lora"]):
        preset = write_preset(root / f"{module}.toml", model, data, root / module, steps)
        extra = {"lora": "", "dylora": "unit = 4\n"}.get(module, f"conv_dim = {RANK}\nconv_alpha = {RANK}\n")
        preset.write_text(preset.read_text().replace("[network]\n", f"[network]\nnetwork_module = \"{module}\"\n{extra}"),
                          encoding="utf-8")
        contenders[module] = preset
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
    params, sizes = {}, {}
    for r in range(rounds):
        for module, preset in contenders.items():
            wall, peak, out = measure([str(BIN / "train-lora"), str(preset), "--quiet"])
            rows[module].append((ours_step_seconds(out, steps), peak))
            params[module] = int(re.search(r"([\d,]+) trainable parameters", out).group(1).replace(",", ""))
            sizes[module] = (root / module / "bench.safetensors").stat().st_size
            print(f"  round {r + 1}: {module}: {rows[module][-1][0]:.3f} s/step, peak RSS {peak:.0f} MiB", flush=True)
    base = statistics.median(x[0] for x in rows["lora"])
    print(f"network types, medians over {rounds} rounds ({steps} steps, rank {RANK}, {SIZE} px, Kohya's module set):")
    for module, runs in rows.items():
        step, peak = (statistics.median(x[i] for x in runs) for i in range(2))
        print(f"  {module:6s} {params[module]:>11,} trainable  file {sizes[module] / 2**20:6.1f} MiB  {step:7.3f} s/step "
              f"({100 * (step / base - 1):+.0f} % vs lora)  peak RSS {peak:7.0f} MiB")


def child_run(preset: str, resume: str) -> None:
    """One run in this process; prints its timings, event times and state sizes as JSON."""
    import json

    from lorasmith.train.config import load_config
    from lorasmith.train.state import load_resume
    from lorasmith.train.trainer import run

    config = load_config(Path(preset))
    result, plan = run(config, progress=False, log=lambda m: None, resume=load_resume(config, resume or None))
    sizes = [sum(f.stat().st_size for f in folder.iterdir()) for folder in result.states if folder.is_dir()]
    print("RESULT " + json.dumps({"timings": result.timings, "events": result.events, "state_bytes": sizes,
                                  "lora_bytes": result.outputs[-1].stat().st_size}))


def overhead(name: str, model: Path, root: Path, rounds: int, steps: int) -> None:
    import json

    data = root / "data"
    prompts = root / "prompts.txt"
    prompts.write_text(f"claymation style, a clay figure --w {SIZE} --h {SIZE} --s 8 --d 1\n", encoding="utf-8")
    plain = write_preset(root / f"{name}-plain.toml", model, data, root / "plain", steps)
    plain.write_text(plain.read_text().replace("[output]", "[output]\nsave_state = false"), encoding="utf-8")
    job = write_preset(root / f"{name}-job.toml", model, data, root / "job", steps)
    job.write_text(job.read_text().replace("[dataset]", "[dataset]\nvalidation_split = 0.2").replace(
        "[output]", "[output]\nsave_state_every_n_steps = 2\nsave_last_n_states = 10") +
        f"[sample]\nsample_prompts = \"{prompts}\"\nsample_every_n_steps = {steps // 2}\n", encoding="utf-8")
    runs: dict[str, list[dict]] = {"plain": [], "batch job": [], "resume": []}
    for r in range(rounds):
        for label, preset, resume in (("plain", plain, ""), ("batch job", job, ""),
                                      ("resume", job, str(root / "job" / "bench.state" / f"step-{steps - 2:08d}"))):
            wall, peak, out = measure([sys.executable, __file__, "--child-run", str(preset), resume])
            result = json.loads(out.split("RESULT ", 1)[1])
            result["wall"], result["peak"] = wall, peak
            runs[label].append(result)
            t, e = result["timings"], result["events"]
            print(f"  {name} round {r + 1}: {label}: train phase {t['train']:.2f} s, state saves "
                  f"{len(e['state save'])}× {sum(e['state save']):.2f} s, sampling {sum(e['sampling']):.2f} s, "
                  f"validation {sum(e['validation']):.2f} s, state load {t.get('state load', 0):.3f} s, "
                  f"whole job {wall:.1f} s, peak RSS {peak:.0f} MiB", flush=True)
    med = statistics.median
    job_runs, plain_runs = runs["batch job"], runs["plain"]
    saves = [x for run in job_runs for x in run["events"]["state save"]]
    samples = [x for run in job_runs for x in run["events"]["sampling"]]
    side = [sum(sum(v) for v in run["events"].values()) for run in job_runs]
    print(f"{name} medians over {rounds} rounds ({steps} steps):")
    print(f"  state save   {med(saves):.3f} s each; size {med(job_runs[0]['state_bytes']) / 2**20:.2f} MiB "
          f"(the LoRA alone: {job_runs[0]['lora_bytes'] / 2**20:.2f} MiB in fp16)")
    print(f"  state load   {med(r['timings']['state load'] for r in runs['resume']):.3f} s")
    print(f"  sampling     {med(samples):.2f} s per event (one 256×256 picture, 8 steps, CFG)")
    print(f"  train phase  plain {med(r['timings']['train'] for r in plain_runs):.2f} s, batch job "
          f"{med(r['timings']['train'] for r in job_runs):.2f} s; states+samples+validation+report "
          f"{med(side):.2f} s = {100 * med(s / r['timings']['train'] for s, r in zip(side, job_runs)):.0f} % of it; "
          f"states alone {100 * med(sum(r['events']['state save']) / r['timings']['train'] for r in job_runs):.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip-sd15", action="store_true")
    parser.add_argument("--only-sd15", action="store_true")
    parser.add_argument("--checkpointing", action="store_true", help="also time train-lora with gradient checkpointing")
    parser.add_argument("--overhead", action="store_true", help="measure states, samples and validation instead")
    parser.add_argument("--sdxl", action="store_true", help="measure the SDXL-architecture model (c) only")
    parser.add_argument("--flux", action="store_true", help="measure the tiny and the reduced-depth full-width Flux")
    parser.add_argument("--types", action="store_true", help="compare network types on the SD1.5 architecture")
    parser.add_argument("--modules", default=",".join(TYPES),
                        help="with --types: the types to compare (lora always runs, as the baseline)")
    parser.add_argument("--child-reference", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-reference-xl", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-reference-flux", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-run", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_run:
        child_run(*args.child_run)
        return
    if args.child_reference_flux:
        reference_flux(args.child_reference_flux[0], args.child_reference_flux[1], int(args.child_reference_flux[2]))
        return
    if args.child_reference_xl:
        reference_xl(args.child_reference_xl[0], args.child_reference_xl[1], int(args.child_reference_xl[2]), True)
        return
    if args.child_reference:
        reference(args.child_reference[0], args.child_reference[1], int(args.child_reference[2]))
        return
    from lorasmith.models.base import quiet_libraries
    from lorasmith.models.tiny import build_sd

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root / "data", size=XL_SIZE if args.sdxl else FLUX_SIZE if args.flux else SIZE)
        sizes = (["tiny-flux", "flux-1x2"] if args.flux else ["sdxl"] if args.sdxl else ["sd15"] if args.only_sd15 or args.types else ["tiny"] if args.skip_sd15
                 else ["tiny", "sd15"])
        for size in sizes:
            start = time.perf_counter()
            model = build_sd(root / f"model-{size}", size)
            print(f"built random-weight {size} model in {time.perf_counter() - start:.0f} s", flush=True)
            steps = args.steps if size in ("sd15", "sdxl", "flux-1x2") else max(args.steps, 20)
            if args.types:
                types(model, root, args.rounds, steps, args.modules.split(","))
            elif args.overhead:
                overhead(size, model, root, args.rounds, steps)
            else:
                bench(size, model, root, args.rounds, steps, args.checkpointing)
    if args.types:
        pass
    elif args.sdxl or args.flux:
        print("goal: train-lora no slower per step than the reference and below it in peak RSS")
    elif not args.overhead:
        print("goal: train-lora no slower per step than the reference; SD1.5 peak RSS ≤ 4.5 GB (4,292 MiB)")


if __name__ == "__main__":
    main()
