"""Run by `accelerate launch` in tests: trains from a preset, then every rank writes its own LoRA weights."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from lorasmith.train.config import load_config
from lorasmith.train.export import kohya_state_dict
from lorasmith.train.trainer import run, world

config = load_config(Path(sys.argv[1]))
result, plan = run(config, progress=False)
rank, processes = world()
save_file(kohya_state_dict(result.unet, result.text_encoder), str(Path(sys.argv[2]) / f"rank{rank}.safetensors"),
          metadata={"processes": str(processes), "steps": str(len(result.losses)), "total": str(plan.total_steps)})
