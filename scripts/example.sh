#!/usr/bin/env bash
# The bundled example, end to end, as a SMOKE RUN: it proves the install and the plumbing, not quality.
# Stage 1b uses a tiny randomly initialised BLIP built on the spot (no download), so its captions are
# word salad. Sets up .venv if needed; re-running does only the missing work.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/prep-images ] || bash scripts/setup.sh
OUT=${LORASMITH_EXAMPLE_OUT:-out/example}
.venv/bin/prep-images datasets_example/raw --out "$OUT" --name "claymation style"
.venv/bin/python -m lorasmith.captioning.tiny "$OUT/models/tiny-blip"
.venv/bin/caption-folder "$OUT" --prefix "claymation style" --model "$OUT/models/tiny-blip" --beam-search
.venv/bin/caption-folder "$OUT" --prefix "claymation style" --prefix-only
