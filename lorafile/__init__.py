"""LoRA files: one in-memory form, one reader for every format users bring (Kohya, diffusers/peft, LyCORIS), one writer, their metadata and hashes."""
