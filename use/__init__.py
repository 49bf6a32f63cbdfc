"""Stage 3: use what was trained — generate with LoRAs, merge, resize, inspect."""
