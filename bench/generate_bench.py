"""What LoRAs cost at inference: seconds per picture with `lora generate`'s renderer on a random-weight model
of the exact SD1.5 architecture (built from configs, no download), CPU, 256 px, 10 steps, CFG 7.5.

Four ways to draw the same prompt and seed: the base model alone; the base with 1 LoRA applied on the fly
(peft adapters, as `lora generate --lora`); with 3 LoRAs on the fly; and the checkpoint `lora merge` wrote
with that one LoRA baked in. LoRAs are rank 16 on the attention projections and the text encoder, as
train-lora's default writes them. Rounds interleave the four; medians are reported, with each one's cost
against the base. One process holds three pipelines (base, base + adapters, merged).

With `--sdxl`: the full SDXL base architecture (SIZES["sdxl"]: 2.6 G UNet parameters, CLIP-L and OpenCLIP-bigG)
with random weights, built in memory, 512 px, 4 steps, fp32 on the CPU. Three ways: the base, 1 LoRA on the fly
(rank 8 on the UNet's attention and both text encoders), and merged (ΔW added into the weights in memory with
`use.apply.merge_into`). One fp32 copy takes 14 GB, so all three share it: the LoRA stays loaded as a peft
adapter (switched off for the other two, which then pass through its wrappers: microseconds per layer against
seconds per step), and the merged way adds ΔW in place before its picture and subtracts it after, outside the
timing.

    .venv/bin/python bench/generate_bench.py [--rounds 3] [--steps 10] [--size 256] [--model DIR]
    .venv/bin/python bench/generate_bench.py --sdxl [--rounds 3] [--steps 4] [--size 512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from loras import attention_and_text, random_modules, write_kohya  # noqa: E402

RANK = 16
XL_RANK = 8


def build(root: Path, model: Path | None) -> tuple[Path, list[Path], Path]:
    """The SD1.5-architecture model, three LoRA files for it and the model with the first one merged."""
    from lorasmith.models.base import load_components
    from lorasmith.models.tiny import build_sd
    from lorasmith.use.apply import layer_table
    from lorasmith.lorafile.read import read_lora
    from lorasmith.use.merge import merge_checkpoint

    if model is None:
        model = build_sd(root / "sd15", "sd15", seed=0)
    parts = load_components(str(model), ("text_encoder", "unet"))
    table = layer_table(parts.unet, parts.text_encoder, aliases=False)
    del parts
    files = [write_kohya(root / f"lora{i}.safetensors", random_modules(table, i, RANK, attention_and_text, 0.02),
                         RANK / 2) for i in range(3)]
    merged, _ = merge_checkpoint(str(model), [(read_lora(files[0]), 1.0)], root / "merged", "diffusers", torch.float32)
    return model, files, merged


def build_sdxl_parts(seed: int = 0):
    """The full SDXL base architecture with random weights, in memory, as `base.load_components` gives a model's
    parts (writing it as a 14 GB folder first would only cost minutes)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lorasmith.models.base import Components
    from lorasmith.models.from_file import sd_scheduler
    from lorasmith.models.tiny import SIZES
    from lorasmith.models.tokenizer import OPENCLIP_PAD, clip_tokenizer

    spec = SIZES["sdxl"]
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(OPENCLIP_PAD)
    torch.manual_seed(seed)
    common = dict(max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=1)
    return Components(
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, name="sdxl (random)", scheduler=sd_scheduler(),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **common, **spec["text"])).eval(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", **common,
                                                                  **spec["text_2"])).eval(),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **spec["vae"]).eval(),
        unet=UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"]).eval())


def sdxl_ways(root: Path, prompt, loading: dict) -> dict:
    """Base, 1 LoRA on the fly and merged on one in-memory SDXL (see the module's docstring)."""
    from lorasmith.lorafile.read import read_lora
    from lorasmith.use.apply import layer_table, merge_into
    from lorasmith.use.render import Renderer

    started = time.perf_counter()
    parts = build_sdxl_parts()
    loading["random SDXL built"] = time.perf_counter() - started
    table = layer_table(parts.unet, parts.text_encoder, aliases=False, text_encoder_2=parts.text_encoder_2)
    chosen = random_modules(table, 0, XL_RANK, lambda k: attention_and_text(k) or k.startswith("lora_te"), 0.02)
    lora = read_lora(write_kohya(root / "xl.safetensors", chosen, XL_RANK / 2, {"ss_base_model_version":
                                                                                "sdxl_base_v1-0"}))
    started = time.perf_counter()
    renderer = Renderer("sdxl (random)", {"l0": lora}, "cpu", family="sdxl", parts=parts)
    loading["LoRA loaded as adapter"] = time.perf_counter() - started
    models = {"unet": parts.unet, "text_encoder": parts.text_encoder, "text_encoder_2": parts.text_encoder_2}

    def merged():
        merge_into(models, [(lora, 1.0)])
        try:
            started = time.perf_counter()
            picture = renderer.draw(prompt, 1, {}, "euler_a")
            return picture, time.perf_counter() - started
        finally:
            merge_into(models, [(lora, -1.0)])

    return {"base": lambda: renderer.draw(prompt, 1, {}, "euler_a"),
            "base + 1 LoRA on the fly": lambda: renderer.draw(prompt, 1, {"l0": 1.0}, "euler_a"),
            "merged (1 LoRA, in memory)": merged}


def sd15_ways(root: Path, model: Path | None, prompt, loading: dict) -> dict:
    """Base, 1 and 3 LoRAs on the fly, and the checkpoint `lora merge` wrote, as three pipelines."""
    from lorasmith.lorafile.read import read_lora
    from lorasmith.use.render import Renderer

    started = time.perf_counter()
    model, files, merged = build(root, model)
    print(f"built model, 3 LoRAs and the merged model in {time.perf_counter() - started:.0f} s")
    started = time.perf_counter()
    base = Renderer(str(model), {}, "cpu")
    loading["base"] = time.perf_counter() - started
    started = time.perf_counter()
    live = Renderer(str(model), {f"l{i}": read_lora(f) for i, f in enumerate(files)}, "cpu")
    loading["base + 3 LoRA files loaded"] = time.perf_counter() - started
    started = time.perf_counter()
    baked = Renderer(str(merged), {}, "cpu")
    loading["merged"] = time.perf_counter() - started
    return {
        "base": lambda: base.draw(prompt, 1, {}, "euler_a"),
        "base + 1 LoRA on the fly": lambda: live.draw(prompt, 1, {"l0": 1.0}, "euler_a"),
        "base + 3 LoRAs on the fly": lambda: live.draw(prompt, 1, {"l0": 1.0, "l1": 0.7, "l2": 0.5}, "euler_a"),
        "merged checkpoint (1 LoRA)": lambda: baked.draw(prompt, 1, {}, "euler_a"),
    }


def timed(way) -> tuple[object, float]:
    """(picture, seconds): a way may time itself (the in-memory merge leaves its bookkeeping out)."""
    started = time.perf_counter()
    out = way()
    return out if isinstance(out, tuple) else (out, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="default 10, with --sdxl 4")
    parser.add_argument("--size", type=int, default=None, help="default 256, with --sdxl 512")
    parser.add_argument("--model", type=Path, default=None, help="an SD1.x diffusers folder (default: build one)")
    parser.add_argument("--sdxl", action="store_true", help="the full SDXL architecture, random, in memory")
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.sdxl else 10)
    args.size = args.size or (512 if args.sdxl else 256)
    if args.sdxl and args.model:
        parser.error("--sdxl builds its own model: leave out --model")

    from lorasmith.common.prompts import Prompt

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {'SDXL' if args.sdxl else 'SD1.5'} "
          f"architecture, {args.size} px, {args.steps} steps, rank {XL_RANK if args.sdxl else RANK}, "
          f"{args.rounds} rounds", flush=True)
    prompt = Prompt("claymation style, a red fox", "blurry", args.size, args.size, None, 7.5, args.steps)
    loading: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ways = sdxl_ways(Path(tmp), prompt, loading) if args.sdxl else sd15_ways(Path(tmp), args.model, prompt,
                                                                                   loading)
        for way in ways.values():  # warm-up: first calls allocate
            timed(way)
        times: dict[str, list[float]] = {name: [] for name in ways}
        pictures = {}
        for round_ in range(args.rounds):
            for name, way in ways.items():
                pictures[name], seconds = timed(way)
                times[name].append(seconds)
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
    report(times, loading, pictures, args.rounds)


def report(times: dict, loading: dict, pictures: dict, rounds: int) -> None:
    """The medians as a table, each against the base, and how far the merged picture is from the on-the-fly
    one (the same ΔW, so a few levels of 255 at most)."""
    import numpy as np

    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{'way':<28} {'s/picture':>10} {'vs base':>9}   (median of {rounds}; spread min-max)")
    for name, value in median.items():
        print(f"{name:<28} {value:>10.2f} {100 * (value / median['base'] - 1):>+8.1f}%   "
              f"({min(times[name]):.2f}-{max(times[name]):.2f})")
    print("load: " + ", ".join(f"{n} {s:.1f} s" for n, s in loading.items()))
    merged = next(p for n, p in pictures.items() if n.startswith("merged"))
    gap = np.abs(np.asarray(merged).astype(int) - np.asarray(pictures["base + 1 LoRA on the fly"]).astype(int)).max()
    print(f"merged vs on-the-fly picture: largest pixel difference {gap} of 255")


if __name__ == "__main__":
    main()
