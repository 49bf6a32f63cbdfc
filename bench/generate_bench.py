"""What LoRAs cost at inference: seconds per picture with `lora generate`'s renderer on a random-weight model
of the exact SD1.5 architecture (built from configs, no download), CPU, 256 px, 10 steps, CFG 7.5.

Four ways to draw the same prompt and seed: the base model alone; the base with 1 LoRA applied on the fly
(peft adapters, as `lora generate --lora`); with 3 LoRAs on the fly; and the checkpoint `lora merge` wrote
with that one LoRA baked in. LoRAs are rank 16 on the attention projections and the text encoder, as
train-lora's default writes them. Rounds interleave the four; medians are reported, with each one's cost
against the base. One process holds three pipelines (base, base + adapters, merged).

    .venv/bin/python bench/generate_bench.py [--rounds 3] [--steps 10] [--size 256] [--model DIR]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--model", type=Path, default=None, help="an SD1.x diffusers folder (default: build one)")
    args = parser.parse_args()

    from lorasmith.common.prompts import Prompt
    from lorasmith.lorafile.read import read_lora
    from lorasmith.use.render import Renderer

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.size} px, {args.steps} steps, "
          f"rank {RANK}, {args.rounds} rounds")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        model, files, merged = build(Path(tmp), args.model)
        print(f"built model, 3 LoRAs and the merged model in {time.perf_counter() - started:.0f} s")
        loading = {}
        started = time.perf_counter()
        base = Renderer(str(model), {}, "cpu")
        loading["base"] = time.perf_counter() - started
        started = time.perf_counter()
        live = Renderer(str(model), {f"l{i}": read_lora(f) for i, f in enumerate(files)}, "cpu")
        loading["base + 3 LoRA files loaded"] = time.perf_counter() - started
        started = time.perf_counter()
        baked = Renderer(str(merged), {}, "cpu")
        loading["merged"] = time.perf_counter() - started
        prompt = Prompt("claymation style, a red fox", "blurry", args.size, args.size, None, 7.5, args.steps)
        ways = {
            "base": lambda: base.draw(prompt, 1, {}, "euler_a"),
            "base + 1 LoRA on the fly": lambda: live.draw(prompt, 1, {"l0": 1.0}, "euler_a"),
            "base + 3 LoRAs on the fly": lambda: live.draw(prompt, 1, {"l0": 1.0, "l1": 0.7, "l2": 0.5}, "euler_a"),
            "merged checkpoint (1 LoRA)": lambda: baked.draw(prompt, 1, {}, "euler_a"),
        }
        for way in ways.values():  # warm-up: first calls allocate
            way()
        times: dict[str, list[float]] = {name: [] for name in ways}
        for round_ in range(args.rounds):
            for name, way in ways.items():
                started = time.perf_counter()
                way()
                times[name].append(time.perf_counter() - started)
            print(f"round {round_ + 1}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
        import numpy as np

        gap = np.abs(np.asarray(ways["merged checkpoint (1 LoRA)"]()).astype(int)
                     - np.asarray(ways["base + 1 LoRA on the fly"]()).astype(int)).max()
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{'way':<28} {'s/picture':>10} {'vs base':>9}   (median of {args.rounds}; spread min-max)")
    for name, value in median.items():
        print(f"{name:<28} {value:>10.2f} {100 * (value / median['base'] - 1):>+8.1f}%   "
              f"({min(times[name]):.2f}-{max(times[name]):.2f})")
    print("load: " + ", ".join(f"{n} {s:.1f} s" for n, s in loading.items()))
    print(f"merged vs on-the-fly picture: largest pixel difference {gap} of 255")


if __name__ == "__main__":
    main()
