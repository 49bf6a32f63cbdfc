"""Stage 2: LoRA training from a preset."""
