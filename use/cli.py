"""lora: use what train-lora made — generate with LoRAs, sweep strengths, merge, resize, inspect.

Every subcommand reads LoRA files written by lorasmith, by Kohya's sd-scripts and in diffusers' format; a
file that does not fit the base model is refused with one sentence, never half-applied.

  lora generate --model BASE --lora clay.safetensors:0.8 --prompt "claymation style, a fox"
  lora generate --model BASE --lora 'out/clay-*.safetensors' --prompt "claymation style, a fox" --sweep
  lora generate --model BASE --lora clay.safetensors --init-image photos/ --strength 0.5 --tags \\
      --prompt "(claymation style:2)"
  lora merge --model BASE --lora clay.safetensors:1 --out clay-model.safetensors
  lora merge --lora a.safetensors:0.7 --lora b.safetensors:0.5 --out ab.safetensors [--rank 16]
  lora resize clay.safetensors --rank 8 --out clay-r8.safetensors
  lora info out/*.safetensors

Exit codes: 0 done, 1 something failed (a picture, a file's health), 2 usage error or a file that does not
fit, 130/143 stopped by Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from lorasmith.common.console import HelpFormatter, at_least, guarded, printable_output
from lorasmith.common.prompts import MAX_SIDE
from lorasmith.models.sampling import ALIASES, SAMPLERS

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
GENERATE_HELP = """Draw with LoRAs at weights: text-to-image, image-to-image (--init-image), strength sweeps.

  lora generate --model BASE --lora clay.safetensors:0.8 --prompt "claymation style, a fox"
  lora generate --model BASE --prompts my-prompts.txt --lora-dir out/lora     # <lora:NAME:W> tags
  lora generate --model BASE --lora 'out/clay-*.safetensors' --prompt "claymation style, a fox" --sweep

Pictures carry A1111's parameters; a second run with the same settings draws only what is missing. A prompt
tag loads files inside the LoRA folders only. Weights are finite numbers within ±100."""


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _weights(text: str) -> list[float]:
    from lorasmith.use.jobs import JobError, check_weight

    try:
        return [check_weight(float(w), "--weights") for w in text.replace(",", " ").split()]
    except ValueError as exc:
        reason = str(exc) if isinstance(exc, JobError) else f"expected numbers such as 0,0.5,1, got {text!r}"
        raise argparse.ArgumentTypeError(reason) from None


def _size(text: str) -> int:
    value = at_least(64)(text)
    if value % 8 or value > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 from 64 to {MAX_SIDE}, got {value}")
    return value


MODEL_HELP = ("a hub id, a diffusers folder or a single-file checkpoint (.safetensors or .ckpt, SD1.x, SD2.x or SDXL, "
              "as downloaded from civitai), as model.pretrained_model in presets")
GENERATE_MODEL_HELP = MODEL_HELP
SIZE_CONDITIONING_MAX = 16384
"""The largest --original-size side or crop offset taken: SDXL saw originals up to about 4096 px, and far beyond
that the conditioning means nothing."""


def _side_pair(text: str, separator: str, names: str, least: int) -> tuple[int, int]:
    parts = text.lower().replace(" ", "").split(separator)
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 2 or not all(least <= v <= SIZE_CONDITIONING_MAX for v in values):
        example = "1024x1024" if separator == "x" else "0,0"
        raise argparse.ArgumentTypeError(f"expected {names} as two whole numbers from {least} to "
                                         f"{SIZE_CONDITIONING_MAX} such as {example}, got {text!r}")
    return values


def _original_size(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT → (width, height), each positive."""
    return _side_pair(text, "x", "WIDTHxHEIGHT", 1)


def _crop(text: str) -> tuple[int, int]:
    """TOP,LEFT → (top, left), each 0 or more."""
    return _side_pair(text, ",", "TOP,LEFT", 0)


def _model(p: argparse.ArgumentParser, required: bool = False, what: str = MODEL_HELP) -> None:
    p.add_argument("--model", required=required, default=None if required else DEFAULT_MODEL,
                   help=f"base model: {what}")


def _generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="text-to-image and image-to-image with LoRAs at weights",
                       formatter_class=HelpFormatter, description=GENERATE_HELP)
    _model(g, what=GENERATE_MODEL_HELP)
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA and its weight (default 1; negative or above 1 allowed); repeat for several; "
                        "a quoted glob gives every match")
    g.add_argument("--lora-dir", action="append", type=Path, default=[], metavar="DIR",
                   help="where <lora:NAME:W> tags in prompts are looked up (repeatable; default: the folders "
                        "of the --lora files, then the current folder)")
    g.add_argument("--prompt", default="", help="prompt; A1111 emphasis (a:1.2), [a], BREAK and <lora:NAME:W> work")
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--prompts", type=Path, help="a file of prompts in Kohya's format (--n --w --h --d --l --s --ss "
                                                "per line), instead of --prompt")
    g.add_argument("--init-image", type=Path, metavar="FILE|DIR",
                   help="image-to-image from this picture, or from every picture of this folder (names kept)")
    g.add_argument("--strength", type=_fraction, default=0.5,
                   help="image-to-image denoise strength: 0 keeps the picture, 1 ignores it; 0.4-0.6 restyles")
    g.add_argument("--tags", action="store_true",
                   help="append each init picture's WD14 tags to --prompt (needs --init-image and onnxruntime)")
    g.add_argument("--tagger", default=None, help="WD14 model for --tags: hub id or folder "
                                                  "(default SmilingWolf/wd-v1-4-convnext-tagger-v2)")
    g.add_argument("--sampler", default="euler_a", choices=[*SAMPLERS, *ALIASES], metavar="NAME",
                   help=f"sampler, as train-lora's sample_sampler: {', '.join(SAMPLERS)}")
    g.add_argument("--seed", type=int, default=None, help="first seed; later pictures count up (default: random)")
    g.add_argument("--n", type=at_least(1), default=1, help="pictures per prompt (and per init picture)")
    g.add_argument("--steps", type=at_least(1), default=30, help="sampling steps")
    g.add_argument("--cfg", type=_finite, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--w", type=_size, default=512, help="width; image-to-image keeps the picture's aspect at about w×h")
    g.add_argument("--h", type=_size, default=512, help="height")
    g.add_argument("--clip-skip", type=at_least(1), default=1,
                   help="Kohya/A1111 convention: 1 = last layer, 2 = penultimate (anime models); SD1.x/SD2.x only "
                        "(SDXL already takes the penultimate layers, and more is refused)")
    g.add_argument("--original-size", type=_original_size, default=None, metavar="WxH",
                   help="SDXL's size conditioning: the original picture size the model is told of (default: the "
                        "picture's own size, as A1111); ignored with a warning on SD1.x/SD2.x bases")
    g.add_argument("--crop-top-left", type=_crop, default=None, metavar="TOP,LEFT",
                   help="SDXL's crop conditioning (default 0,0: uncropped); ignored with a warning on SD1.x/SD2.x "
                        "bases")
    g.add_argument("--sweep", action="store_true",
                   help="one grid per prompt and seed: rows = the --lora files, columns = --weights; "
                        "the LoRA weights given with the files are ignored")
    g.add_argument("--weights", type=_weights, default=[0, 0.25, 0.5, 0.75, 1.0], metavar="W,W,...",
                   help="the sweep's columns; 0 is the base model")
    g.add_argument("--out", type=Path, default=Path("outputs"), help="folder for pictures and grids")
    g.add_argument("--overwrite", action="store_true", help="redraw pictures that already exist with these settings")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="auto: fp16 on CUDA, fp32 on the CPU")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    m = sub.add_parser("merge", formatter_class=HelpFormatter,
                       help="bake LoRAs into the base model, or merge several LoRAs into one file")
    m.add_argument("--model", default=None, help=f"base model ({MODEL_HELP}): the LoRAs are baked into it; without "
                                                 "it, the LoRAs are merged into one LoRA file")
    m.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]", help="a LoRA and its weight")
    m.add_argument("--out", type=Path, required=True,
                   help="the file (or diffusers folder) to write; never an input, and never a folder lorasmith "
                        "did not write")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists (a file, or a folder an "
                                                           "earlier lora merge wrote)")
    m.add_argument("--format", choices=["checkpoint", "diffusers"], default="checkpoint",
                   help="with --model: one original-layout .safetensors (A1111, ComfyUI) or a diffusers folder")
    m.add_argument("--rank", type=at_least(1), default=None,
                   help="LoRA merge: SVD the summed ΔW to this rank (default: ranks concatenated, exact)")
    m.add_argument("--save-precision", choices=["fp32", "fp16", "bf16"], default="fp16",
                   help="precision of the written tensors")
    r = sub.add_parser("resize", formatter_class=HelpFormatter, help="SVD a LoRA to a lower rank",
                       description="SVD a LoRA to a lower rank. A DyLoRA file (train-lora's network_module = "
                                   "\"dylora\") is cut to its first --rank ranks instead, which it trained to "
                                   "work alone; --rank is then a multiple of its unit.")
    r.add_argument("file", type=Path, help="the LoRA to resize (not changed)")
    r.add_argument("--rank", type=at_least(1), required=True, help="the new rank (with --dynamic: the largest)")
    r.add_argument("--dynamic", type=_fraction, default=None, metavar="SHARE",
                   help="per module, the smallest rank keeping this share of ΔW's Frobenius norm, e.g. 0.9")
    r.add_argument("--out", type=Path, default=None, help="output file (default: FILE-r<rank>.safetensors beside it)")
    r.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never the input)")
    r.add_argument("--save-precision", choices=["fp32", "fp16", "bf16"], default="fp16",
                   help="precision of the written tensors")
    i = sub.add_parser("info", formatter_class=HelpFormatter, help="what a LoRA file is, and whether it is healthy")
    i.add_argument("files", type=Path, nargs="+", help="LoRA files")
    i.add_argument("--model", default=None, help=f"check the names against this base model ({MODEL_HELP}); "
                                                 "default: the public architecture the file's metadata names "
                                                 "(SD1.5, SD2.1 or SDXL base), built without weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    printable_output()
    from lorasmith.models.base import quiet_libraries

    quiet_libraries()  # before diffusers is imported, which sets off bitsandbytes' notices
    from lorasmith.common.hub import ModelNotFound
    from lorasmith.use import commands
    from lorasmith.use.jobs import JobError
    from lorasmith.lorafile.read import LoraError

    run = {"generate": commands.generate, "merge": commands.merge, "resize": commands.resize,
           "info": commands.info}[args.command]
    code, result = guarded("lora", "finished outputs are kept", (LoraError, JobError, ModelNotFound),
                           lambda: run(args))
    return code if code is not None else result


if __name__ == "__main__":
    sys.exit(main())
