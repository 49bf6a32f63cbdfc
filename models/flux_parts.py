"""A Flux.1 base kept as ComfyUI users keep it: the transformer in BFL's layout (`flux1-dev.safetensors`) and its
CLIP-L, T5-XXL and VAE each in a file of their own (`clip_l.safetensors`, `t5xxl_fp16.safetensors`,
`ae.safetensors`, sd-scripts' --clip_l, --t5xxl and --ae). Every architecture is read off the tensor shapes, so
nothing is fetched; only T5's tokenizer lives in no such file and comes from a folder or the Hugging Face cache.
"""

from __future__ import annotations

import re
from pathlib import Path

T5_TOKENIZER = "google/t5-v1_1-xxl"
"""The tokenizer FLUX.1's T5-XXL was trained with (FLUX.1-dev's tokenizer_2 is this one)."""
CLIP_HEAD = 64
"""CLIP's attention head width (CLIP-L: 768 = 12 × 64), which the weights do not record."""


def _count(shapes, pattern: str) -> int:
    return 1 + max(int(m.group(1)) for k in shapes if (m := re.match(pattern, k)))


def _open(path: str, what: str, key: str):
    from lorasmith.models.from_file import SafetensorsFile
    from lorasmith.models.single_file import CheckpointError

    if not path:
        raise CheckpointError(f"model.{key} is empty: a Flux.1 transformer file holds no {what}; train-lora takes "
                              "its CLIP-L, T5-XXL and VAE files as model.clip_l, model.t5xxl and model.ae (ComfyUI's "
                              "clip_l.safetensors, t5xxl_fp16.safetensors, ae.safetensors), or pass a diffusers folder")
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(f"model.{key} = {path}: no such file (the {what})")
    tensors = SafetensorsFile(file)
    return tensors, {k: tuple(v.shape) for k, v in tensors.shapes().items()}


def load_clip_l(path: str):
    """CLIP-L from its own file, transformers' key layout with or without the `text_model.` wrapper."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorasmith.models.from_file import _build, _fill

    tensors, shapes = _open(path, "CLIP-L text encoder", "clip_l")
    shapes = {k.removeprefix("text_model."): v for k, v in shapes.items()}
    vocab, width = shapes["embeddings.token_embedding.weight"]
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=width, num_attention_heads=max(1, width // CLIP_HEAD),
                            intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
                            num_hidden_layers=_count(shapes, r"encoder\.layers\.(\d+)\."),
                            max_position_embeddings=shapes["embeddings.position_embedding.weight"][0],
                            hidden_act="quick_gelu", projection_dim=width)
    model = _build(CLIPTextModel, config=config)
    wrapped = hasattr(model, "text_model")  # transformers < 5.6
    weights = {("text_model." if wrapped else "") + k.removeprefix("text_model."): tensors[k] for k in tensors
               if not k.startswith(("text_projection", "logit_scale"))}
    return _fill(model, weights, "CLIP-L text encoder", Path(path).name).to(torch.float32)


def load_t5(path: str):
    """T5-XXL's encoder from its own file (transformers' T5EncoderModel layout, gated-GELU MLP)."""
    from transformers import T5Config, T5EncoderModel

    from lorasmith.models.from_file import _build, _fill

    tensors, shapes = _open(path, "T5-XXL text encoder", "t5xxl")
    embed = "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight"
    vocab, width = shapes[embed]
    heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"][1]
    config = T5Config(vocab_size=vocab, d_model=width, num_heads=heads,
                      d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
                      d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
                      num_layers=_count(shapes, r"encoder\.block\.(\d+)\."), feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, pad_token_id=0, eos_token_id=1)
    model = _build(T5EncoderModel, config=config)
    weights = {k: tensors[k] for k in tensors}
    weights.setdefault("shared.weight", weights.get("encoder.embed_tokens.weight"))
    weights.setdefault("encoder.embed_tokens.weight", weights["shared.weight"])
    return _fill(model, weights, "T5-XXL text encoder", Path(path).name)


def load_ae(path: str):
    """Flux's 16-channel VAE from BFL's `ae.safetensors` (the LDM layout, unprefixed), with Flux's latent scale
    and shift."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from lorasmith.models.from_file import _build, _fill
    from lorasmith.models.single_file import vae_config

    tensors, _ = _open(path, "VAE", "ae")
    state = {f"first_stage_model.{k}": tensors[k] for k in tensors}
    config = {**vae_config({k: v for k, v in state.items()}), "scaling_factor": 0.3611, "shift_factor": 0.1159}
    model = _build(AutoencoderKL, **config)
    return _fill(model, convert_ldm_vae_checkpoint(state, model.config), "VAE", Path(path).name)


def load_t5_tokenizer(name: str):
    from transformers import T5TokenizerFast

    from lorasmith.common.hub import load_model

    return load_model(name or T5_TOKENIZER, T5TokenizerFast.from_pretrained, "T5-XXL tokenizer (model.t5_tokenizer)")


def scheduler_for(guided: bool):
    """FLUX.1-dev's flow-matching schedule (resolution-dependent shift); schnell's is unshifted."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from lorasmith.models.tiny_flux import SCHEDULER

    return FlowMatchEulerDiscreteScheduler(**(SCHEDULER if guided else {**SCHEDULER, "shift": 1.0,
                                                                       "use_dynamic_shifting": False}))
