"""Base models: one module per family, reading and writing checkpoints in both layouts, tokenizers, samplers, and the tiny random builds tests use."""
