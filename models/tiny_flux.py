"""A random-weight Flux.1 built from configs and saved as a FluxPipeline folder, as diffusers' own Flux tests build
theirs: `tiny-flux` (two double and two single blocks, 32 wide) for tests, `flux-1x2` (one double and two single
blocks at Flux.1-dev's full width, 3072) for measuring a step at real width on a CPU. T5's tokenizer is built in
memory. None makes a meaningful picture.
"""

from __future__ import annotations

import json
from pathlib import Path

FLUX_SIZES = {
    "tiny-flux": dict(
        transformer=dict(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                         joint_attention_dim=32, pooled_projection_dim=64, axes_dims_rope=(4, 6, 6)),
        # CLIP's heads are 64 wide, as in CLIP-L: a file of its own records no head count
        clip=dict(hidden_size=64, intermediate_size=37, num_hidden_layers=2, num_attention_heads=1, projection_dim=64),
        t5=dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4),
        vae=dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
    ),
    "flux-1x2": dict(
        transformer=dict(num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=24,
                         joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56)),
        clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=1, num_attention_heads=12,
                  projection_dim=768),
        t5=dict(d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=4),
        vae=dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8),
    ),
}
FLUX1 = dict(
    transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                     axes_dims_rope=(16, 56, 56)),
    clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"),
    t5=dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
            feed_forward_proj="gated-gelu", is_encoder_decoder=False),
    vae=dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
             layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
             use_quant_conv=False, use_post_quant_conv=False, sample_size=1024,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
)
"""FLUX.1-dev's and schnell's public configs (schnell: no guidance input), for --preflight without weights."""
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)
"""FLUX.1-dev's scheduler config."""


def t5_tokenizer():
    """A T5 tokenizer over printable ASCII (SentencePiece's unigram model with its ▁ word marker), ending every
    sequence with </s> as T5's does."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = sorted(set(string.printable.strip()) | {"▁"})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0) for p in pieces]
    core = Tokenizer(models.Unigram(vocab, unk_id=2))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def build_flux(folder: Path, size: str = "tiny-flux", seed: int = 0, guidance: bool = True) -> Path:
    """Write a FluxPipeline folder: CLIP-L- and T5-shaped encoders, the 16-channel VAE with Flux's latent scale and
    shift, the transformer (dev's guidance input unless `guidance` is False: schnell) and its scheduler."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lorasmith.models.tokenizer import clip_tokenizer

    spec = FLUX_SIZES[size]
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, hidden_act="quick_gelu", vocab_size=49408,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id, **spec["clip"]))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                 pad_token_id=0, eos_token_id=1, **spec["t5"]))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False, sample_size=128,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        **spec["vae"])
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=guidance, **spec["transformer"])
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"tokenizer": tokenizer, "text_encoder": clip, "tokenizer_2": tokenizer_2, "text_encoder_2": t5,
             "vae": vae, "transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER)}
    for name, part in parts.items():
        part.save_pretrained(folder / name)
    index = {"_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "image_encoder": [None, None], "feature_extractor": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder
