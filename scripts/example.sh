#!/usr/bin/env bash
# The bundled example: all three stages on a CPU in a few minutes, and a LoRA that visibly learns.
#   prep-images     datasets_example/raw (clay shapes in every awkward format) → a Kohya repeat folder;
#   caption-folder  keeps the sidecar captions, captions the one picture without one (a tiny random BLIP
#                   built on the spot, so that caption is word salad), then puts "claymation style" first;
#   train-lora      teaches the toy base model (toy/base: flat 64-px shapes, no clay) the clay look;
#   lora generate   draws one prompt with every saved epoch at weights 0 to 1, in one grid.
# Open out/example/lora/toy-clay.report.html: the step-0 grid shows flat shapes, the last one clay; and
# out/example/sweep/sweep-*.png: rows = epochs, columns = LoRA weights.
# Sets up .venv if needed. Re-running prepares and captions only what is missing and trains again;
# arguments go to train-lora (after a Ctrl-C: bash scripts/example.sh --resume auto).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/prep-images ] || bash scripts/setup.sh
OUT=${LORASMITH_EXAMPLE_OUT:-out/example}
.venv/bin/prep-images datasets_example/raw --out "$OUT" --name "claymation style"
.venv/bin/python -m lorasmith.models.tiny_blip "$OUT/models/tiny-blip"
.venv/bin/caption-folder "$OUT" --prefix "claymation style" --model "$OUT/models/tiny-blip" --beam-search
.venv/bin/caption-folder "$OUT" --prefix "claymation style" --prefix-only
.venv/bin/train-lora presets/toy-clay.toml --set "dataset.train_data_dir=$OUT" --set "output.output_dir=$OUT/lora" "$@"
.venv/bin/lora generate --model toy/base --lora "$OUT/lora/toy-clay*.safetensors" --sweep --quiet \
    --prompt "claymation style, a red circle" --w 64 --h 64 --steps 25 --sampler ddim --seed 1 --out "$OUT/sweep"
