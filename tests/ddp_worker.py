"""Run by `accelerate launch` in tests: trains from a preset (resuming from argv[3] if given), then every
rank writes its own LoRA weights to argv[2]."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from lorasmith.train.config import load_config
from lorasmith.train.state import load_resume
from lorasmith.lorafile.export import kohya_state_dict
from lorasmith.train.trainer import run, world

config = load_config(Path(sys.argv[1]))
resume = load_resume(config, sys.argv[3]) if len(sys.argv) > 3 else None
result, plan = run(config, progress=False, resume=resume)
rank, processes = world()
save_file(kohya_state_dict(result.unet, result.text_encoders or None, family=result.family),
          str(Path(sys.argv[2]) / f"rank{rank}.safetensors"),
          metadata={"processes": str(processes), "steps": str(len(result.losses)), "total": str(plan.total_steps)})
