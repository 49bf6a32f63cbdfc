#!/usr/bin/env bash
# The bundled example, all three stages, as a SMOKE RUN: it proves the install and the plumbing, not
# image quality. Captioning and training use tiny randomly initialised models built on the spot (no
# download), so the captions are word salad and the LoRA, while real in format, teaches nothing.
# Sets up .venv if needed; re-running does only the missing work.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/prep-images ] || bash scripts/setup.sh
OUT=${LORASMITH_EXAMPLE_OUT:-out/example}
.venv/bin/prep-images datasets_example/raw --out "$OUT" --name "claymation style"
.venv/bin/python -m lorasmith.captioning.tiny "$OUT/models/tiny-blip"
.venv/bin/caption-folder "$OUT" --prefix "claymation style" --model "$OUT/models/tiny-blip" --beam-search
.venv/bin/caption-folder "$OUT" --prefix "claymation style" --prefix-only
.venv/bin/python -m lorasmith.train.tiny "$OUT/models/tiny-sd"
.venv/bin/train-lora presets/smoke.toml --set "model.pretrained_model=$OUT/models/tiny-sd" \
    --set "dataset.train_data_dir=$OUT" --set "output.output_dir=$OUT/lora"
