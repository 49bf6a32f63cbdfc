"""Prompt embeddings with clip skip, in Kohya's convention, for both layouts of transformers' CLIPTextModel.

Kohya and A1111 count clip_skip = 1 as "no skip" and 2 as "penultimate hidden state, then the final layer
norm"; diffusers' own clip_skip = 1 already means the penultimate layer, and diffusers 0.42 reaches for
`.text_model`, which transformers ≥ 5.6 removed. This is the one place embeddings are computed.
"""

from __future__ import annotations


def text_layers(text_encoder):
    """The module holding `encoder` and `final_layer_norm`: the model itself (transformers ≥ 5.6) or `.text_model`."""
    model = getattr(text_encoder, "module", text_encoder)  # unwrap DistributedDataParallel
    return getattr(model, "text_model", model)


def tokenize(tokenizer, captions: list[str]):
    """Token ids padded to the tokenizer's 77 positions; longer captions are cut, as in Kohya's default."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompts(text_encoder, input_ids, clip_skip: int = 1):
    """Per-token embeddings for the UNet's cross-attention. `clip_skip` in Kohya's convention (1 = last layer)."""
    if clip_skip <= 1:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True)
    return text_layers(text_encoder).final_layer_norm(out.hidden_states[-clip_skip])
