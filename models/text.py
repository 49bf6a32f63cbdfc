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


def tokenize(tokenizer, captions: list[str], max_tokens: int = 75):
    """Token ids padded to the tokenizer's 77 positions; longer captions are cut, as in Kohya's default. With
    `max_tokens` 150 or 225 (Kohya's max_token_length), ids of shape [batch, chunks, 77]: see `long_ids`."""
    if max_tokens <= tokenizer.model_max_length - 2:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    return long_ids(tokenizer, captions, max_tokens)


def long_ids(tokenizer, captions: list[str], max_tokens: int):
    """Kohya's long captions: up to `max_tokens` tokens cut into chunks of 75, each chunk given its own start
    token and a closing token, so the text encoder (which knows 77 positions) reads each chunk alone.

    The closing token is the caption's last position (end or pad) unless the chunk is full of words, which then
    end with the end token; a chunk that starts with padding starts with the end token instead. For SD1.x (pad
    is the end token) both rules change nothing. This is `get_input_ids` in sd-scripts' train_util.
    """
    import torch

    size = tokenizer.model_max_length - 2
    ids = tokenizer(captions, padding="max_length", max_length=max_tokens + 2, truncation=True,
                    return_tensors="pt").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    chunks = []
    for start in range(1, max_tokens + 1, size):
        body = ids[:, start : start + size]
        last = ids[:, -1:].clone()
        if pad != eos:
            words = (body[:, -1] != eos) & (body[:, -1] != pad)
            last[words, 0] = eos
            body = body.clone()
            body[body[:, 0] == pad, 0] = eos
        chunks.append(torch.cat([torch.full_like(last, bos), body, last], dim=1))
    return torch.stack(chunks, dim=1)


def join_chunks(states, chunks: int):
    """Per-chunk hidden states [batch·chunks, 77, d] back to one sequence [batch, 75·chunks + 2, d]: the first
    chunk's start, every chunk's 75 word positions, the last chunk's closing position, as sd-scripts joins them."""
    import torch

    if chunks == 1:
        return states
    states = states.reshape(-1, chunks, *states.shape[1:])
    words = states[:, :, 1:-1].reshape(states.shape[0], -1, states.shape[-1])
    return torch.cat([states[:, 0, :1], words, states[:, -1, -1:]], dim=1)


def encode_long(text_encoder, ids, clip_skip: int = 1):
    """`encode_prompts` for ids from `tokenize` of any length: each chunk encoded alone, then joined."""
    if ids.dim() == 2:
        return encode_prompts(text_encoder, ids, clip_skip)
    chunks = ids.shape[1]
    return join_chunks(encode_prompts(text_encoder, ids.reshape(-1, ids.shape[-1]), clip_skip), chunks)


def encode_prompts(text_encoder, input_ids, clip_skip: int = 1):
    """Per-token embeddings for the UNet's cross-attention. `clip_skip` in Kohya's convention (1 = last layer)."""
    if clip_skip <= 1:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True)
    return text_layers(text_encoder).final_layer_norm(out.hidden_states[-clip_skip])
