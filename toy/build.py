"""Train the toy base model from scratch: a text-to-image Stable Diffusion (diffusers layout) that draws
"a red circle", "a blue square", … at 64 px, and knows nothing of clay.

    .venv/bin/python -m toy.build [--out toy/base] [--threads N] [--quick]

Three steps, all seeded and on the CPU: (1) the VAE learns to reconstruct flat shapes, clay-shaded shapes
and smooth random textures (a base VAE is trained on everything, as SD's was; the diffusion model below
never sees clay); (2) the UNet and the text encoder learn to draw flat shapes from their captions, with
10 % empty captions so classifier-free guidance works; (3) the result is sampled for every colour × shape
and scored with `toy.scores`. `SETTINGS` is the source of truth: `toy/base/build.json` records it with the
figures measured, and a test checks the shipped model against it. The same seed and thread count give
the same weights; another thread count may differ in the last bits (CPU reductions change order).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from toy import world

HERE = Path(__file__).resolve().parent
BASE = HERE / "base"
WORDS = ("a", *world.COLOURS, *world.SHAPES)


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    vae: dict = field(default_factory=lambda: dict(
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, latent_channels=4,
        sample_size=world.SIZE, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3))
    unet: dict = field(default_factory=lambda: dict(
        sample_size=world.SIZE // 4, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")))
    text: dict = field(default_factory=lambda: dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64))
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    text_lr: float = 2e-4
    empty_caption: float = 0.1
    robust_steps: int = 1000
    """Then the same training with made-up words around the captions (`noisy_caption`)."""
    robust_unet_lr: float = 3e-4
    robust_text_lr: float = 5e-4
    pool: int = 4096
    """Flat pictures encoded once for the UNet's training; each step draws a batch from them."""
    eval_seeds: int = 4
    eval_steps: int = 25
    eval_cfg: float = 7.5

    def quick(self) -> "Settings":
        """A few steps of everything: for checking the script, not for a model."""
        return Settings(**{**asdict(self), "vae_steps": 20, "unet_steps": 20, "robust_steps": 10, "pool": 64, "eval_seeds": 1,
                           "eval_steps": 4})


SETTINGS = Settings()


def tokenizer():
    """A CLIP tokenizer whose vocabulary holds the toy world's words whole, plus the 256 byte symbols and
    their end-of-word forms, so any other word (a trigger phrase) still gets tokens instead of
    <|endoftext|>. The merges build each word letter by letter."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            tokens.append(pieces[0])
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    merges = [tuple(m.split(" ")) for m in dict.fromkeys(merges)]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77)


def texture(rng: random.Random, size: int) -> Image.Image:
    """A smooth random picture (blurred noise or a gradient, sometimes under a shape): the VAE must not
    learn only the dozen flat looks."""
    noise = np.random.default_rng(rng.randrange(2**32)).uniform(0, 255, (size // 8, size // 8, 3))
    image = Image.fromarray(noise.astype(np.uint8), "RGB").resize((size, size), Image.Resampling.BICUBIC)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 3)))
    if rng.random() < 0.5:
        scene = world.random_scene(rng, size)
        image.paste(world.draw(scene, style=rng.random() < 0.5), mask=world.shape_mask(scene.shape, scene.box(), size))
    return image


def vae_picture(rng: random.Random, size: int = world.SIZE) -> Image.Image:
    kind = rng.random()
    if kind < 0.4:
        return world.draw(world.random_scene(rng, size))
    if kind < 0.7:
        return world.draw(world.random_scene(rng, size), style=True)
    if kind < 0.85:
        image = world.draw(world.random_scene(rng, size), style=rng.random() < 0.5)
        other = world.random_scene(rng, size)
        image.paste(world.draw(other, style=rng.random() < 0.5), mask=world.shape_mask(other.shape, other.box(), size))
        return image
    return texture(rng, size)


def to_tensor(images: list[Image.Image]):
    import torch

    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def to_images(tensor) -> list[Image.Image]:
    array = ((tensor.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in array]


def train_vae(settings: Settings, log) -> "object":
    import torch
    from diffusers import AutoencoderKL
    from diffusers.optimization import get_scheduler

    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, **settings.vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=settings.vae_steps // 20,
                             num_training_steps=settings.vae_steps)
    vae.train()
    for step in range(settings.vae_steps):
        batch = to_tensor([vae_picture(rng) for _ in range(settings.vae_batch)])
        posterior = vae.encode(batch).latent_dist
        out = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(out, batch) + 0.5 * (out - batch).abs().mean()
        loss = loss + settings.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == settings.vae_steps - 1:
            log(f"vae step {step + 1}/{settings.vae_steps}: loss {loss.item():.4f}")
    vae.eval()
    return vae


def vae_check(vae, seed: int, count: int = 48) -> dict:
    """The style's and the content's survival through encode → decode, scored on fresh pictures."""
    import torch

    from toy import scores

    clay = [im for im, _ in world.pictures(seed + 1, count, style=True)]
    flat = world.pictures(seed + 2, count)
    with torch.no_grad():
        clay_out = to_images(vae.decode(vae.encode(to_tensor(clay)).latent_dist.mode()).sample)
        flat_out = to_images(vae.decode(vae.encode(to_tensor([im for im, _ in flat])).latent_dist.mode()).sample)
    return {"clay_style_original": float(np.mean([scores.style_score(im) for im in clay])),
            "clay_style_decoded": float(np.mean([scores.style_score(im) for im in clay_out])),
            "flat_content_decoded": scores.content_accuracy([(im, s.colour, s.shape)
                                                             for im, (_, s) in zip(flat_out, flat)])}


def scaling_factor(vae, seed: int) -> float:
    """1 / std of the latents, as SD's 0.18215 was chosen: the UNet then sees unit-variance inputs."""
    import torch

    images = [vae_picture(random.Random(seed + i)) for i in range(256)]
    with torch.no_grad():
        latents = vae.encode(to_tensor(images)).latent_dist.mode()
    return float(1 / latents.std())


def encode_pool(vae, settings: Settings):
    import torch

    rng = random.Random(settings.seed + 3)
    scenes = [world.random_scene(rng) for _ in range(settings.pool)]
    latents = []
    with torch.no_grad():
        for i in range(0, len(scenes), 256):
            batch = to_tensor([world.draw(s) for s in scenes[i : i + 256]])
            latents.append(vae.encode(batch).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(latents), [s.caption for s in scenes]


def scheduler():
    """SD's own noise schedule: a LoRA trained on the toy model meets the schedule a real one does."""
    from lorasmith.models.tiny import sd_scheduler

    return sd_scheduler()


def new_models(settings: Settings, tok):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(settings.seed + 1)
    encoder = CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, hidden_act="quick_gelu", vocab_size=len(tok),
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id, **settings.text))
    return UNet2DConditionModel(in_channels=4, out_channels=4, **settings.unet), encoder


def stray_words(rng: random.Random) -> str:
    """One to three made-up words of any letters (none of them a toy word): they tokenize into the single
    letters and letter pairs a trigger phrase such as "claymation style" is made of."""
    words, count = [], rng.randint(1, 3)
    while len(words) < count:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10)))
        if word not in WORDS:
            words.append(word)
    return " ".join(words)


def noisy_caption(caption: str, rng: random.Random) -> str:
    """The caption with made-up words before and/or after it, as a trigger phrase or a tag list puts them:
    the model learns to find the colour and shape words at any position and to ignore words it does not
    know, as a real text encoder pre-trained on the web does."""
    before = f"{stray_words(rng)}, " if rng.random() < 0.8 else ""
    after = f", {stray_words(rng)}" if rng.random() < 0.3 else ""
    return before + caption + after


def train_unet(settings: Settings, pool, tok, log, unet, encoder, steps: int, lrs: tuple[float, float],
               seed: int, robust: bool):
    """Denoising training of the UNet and the text encoder on the `encode_pool` latents and captions;
    `robust` mixes made-up words into the captions."""
    import torch
    from diffusers.optimization import get_scheduler

    rng = random.Random(seed + 3)
    noise_schedule = scheduler()
    latents, captions = pool
    optimizer = torch.optim.AdamW([{"params": unet.parameters(), "lr": lrs[0]},
                                   {"params": encoder.parameters(), "lr": lrs[1]}], weight_decay=1e-2)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=steps // 20, num_training_steps=steps)
    params = [*unet.parameters(), *encoder.parameters()]
    unet.train()
    encoder.train()
    name = "robust" if robust else "unet"
    for step in range(steps):
        index = [rng.randrange(len(captions)) for _ in range(settings.unet_batch)]
        text = ["" if rng.random() < settings.empty_caption else
                noisy_caption(captions[i], rng) if robust else captions[i] for i in index]
        ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        clean = latents[index]
        noise = torch.randn_like(clean)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(index),))
        pred = unet(noise_schedule.add_noise(clean, noise, t), t, encoder(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"{name} step {step + 1}/{steps}: loss {loss.item():.4f}")
    unet.eval()
    encoder.eval()
    return unet, encoder


def save(folder: Path, tok, encoder, vae, unet) -> None:
    from lorasmith.models.tiny import save_pipeline

    save_pipeline(folder, tok, encoder, vae, unet, scheduler())


def load_models(folder: Path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return UNet2DConditionModel.from_pretrained(folder / "unet"), CLIPTextModel.from_pretrained(folder / "text_encoder")


def load_vae(folder: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder / "vae").eval()


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BASE, help="folder to write the model to (default: toy/base)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--stage", choices=("vae", "all"), default="all",
                        help="stop after the VAE (default: all). A VAE already in --out is reused, so a build "
                             "can run in two sittings")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything, to check the script")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from toy.sampling import contact_sheet, pipeline, sample, summarise

    settings = SETTINGS.quick() if args.quick else SETTINGS
    log = lambda message: print(message, flush=True)  # noqa: E731
    record_path = args.out / "build.json"
    previous = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record = {"settings": asdict(settings), "stages": {}}
    stages = record["stages"]

    def finish(stage: str, start: float) -> None:
        stages[stage] = {"seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
                         "torch": torch.__version__}

    if (args.out / "vae" / "config.json").is_file() and "vae" in previous.get("stages", {}):
        stages["vae"] = previous["stages"]["vae"]
        vae = load_vae(args.out)
        log(f"reusing the VAE in {args.out / 'vae'}")
    else:
        start = time.perf_counter()
        vae = train_vae(settings, log)
        vae.register_to_config(scaling_factor=scaling_factor(vae, settings.seed))
        finish("vae", start)
        vae.save_pretrained(args.out / "vae")
    record["vae_check"] = check = vae_check(vae, settings.seed)
    log(f"VAE round trip: clay style {check['clay_style_original']:.3f} → {check['clay_style_decoded']:.3f}, "
        f"flat content accuracy {100 * check['flat_content_decoded']:.0f} %, "
        f"scaling factor {vae.config.scaling_factor:.4f}")
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if args.stage == "vae":
        return 0
    tok = tokenizer()
    pool = encode_pool(vae, settings)
    if "unet" in previous.get("stages", {}) and (args.out / "unet" / "config.json").is_file():
        stages["unet"] = previous["stages"]["unet"]
        unet, encoder = load_models(args.out)
        log(f"reusing the UNet and text encoder in {args.out}")
    else:
        start = time.perf_counter()
        unet, encoder = train_unet(settings, pool, tok, log, *new_models(settings, tok), settings.unet_steps,
                                   (settings.unet_lr, settings.text_lr), settings.seed + 1, robust=False)
        finish("unet", start)
        save(args.out, tok, encoder, vae, unet)
        record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    start = time.perf_counter()
    torch.manual_seed(settings.seed + 2)
    unet, encoder = train_unet(settings, pool, tok, log, unet, encoder, settings.robust_steps,
                               (settings.robust_unet_lr, settings.robust_text_lr), settings.seed + 2, robust=True)
    finish("robust", start)
    save(args.out, tok, encoder, vae, unet)
    pipe = pipeline(args.out)
    samples = sample(pipe, False, range(settings.eval_seeds), settings.eval_steps, settings.eval_cfg)
    record["evaluation"] = report = summarise(samples)
    prefixed = sample(pipe, False, range(settings.eval_seeds), settings.eval_steps, settings.eval_cfg,
                      prefix="zqxv wobble, ")
    record["evaluation_with_made_up_words_first"] = summarise(prefixed)
    contact_sheet(samples).save(args.out / "samples.png")
    log(f"base model content accuracy {100 * report['content_accuracy']:.1f} % over {report['samples']} samples "
        f"({100 * record['evaluation_with_made_up_words_first']['content_accuracy']:.1f} % with made-up words first), "
        f"style {report['style_mean']:.3f}; stages: " + ", ".join(
            f"{name} {v['seconds']:.0f} s on {v['threads']} threads" for name, v in stages.items()))
    record_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
