#!/usr/bin/env bash
# Create .venv and install lorasmith into it. torch comes first and pinned: on an empty environment a bare
# torch requirement (diffusers, accelerate and peft all have one) resolves to a multi-GB CUDA build.
# Set TORCH_SPEC to pick another build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
.venv/bin/python -m pip install -q -e '.[test]'
