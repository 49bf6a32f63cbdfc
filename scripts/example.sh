#!/usr/bin/env bash
# The bundled example, end to end: set up .venv if needed, then prepare datasets_example/raw into
# out/example/. Re-running it does only the missing work.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/prep-images ] || bash scripts/setup.sh
OUT=${LORASMITH_EXAMPLE_OUT:-out/example}
.venv/bin/prep-images datasets_example/raw --out "$OUT" --name "claymation style"
