"""A random-weight Stable Diffusion built from configs and saved as a normal diffusers folder.

`tiny` proves the install and the plumbing in seconds (smoke runs, tests); `sd15` is the exact SD1.5
architecture (860 M UNet parameters) for measuring speed and memory without downloading anything. `tiny-xl` and
`sdxl` are the same for SDXL base (two text encoders, the size/crop-conditioned UNet; 2.6 G UNet parameters in
`sdxl`), with CLIP's real tokenizer; `tiny-flux` and `flux-1x2` are Flux.1 (`tiny_flux.py`). None makes a
meaningful picture.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorasmith.models.from_file import sd_scheduler
from lorasmith.models.tiny_flux import FLUX_SIZES

SIZES = {
    "tiny": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=16, sample_size=16),
        vae=dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=128,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                  projection_dim=32),
    ),
    "sd15": dict(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                  attention_head_dim=8, sample_size=64),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, vocab_size=49408),
    ),
    "tiny-xl": dict(
        unet=dict(block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64, attention_head_dim=(1, 2),
                  use_linear_projection=True, transformer_layers_per_block=(1, 2), sample_size=16,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
        vae=dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=128,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 scaling_factor=0.13025),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
                  vocab_size=49408),
        text_2=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=32, vocab_size=49408),
    ),
    "sdxl": dict(
        unet=dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                  attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
                  sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 scaling_factor=0.13025, force_upcast=True),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, vocab_size=49408),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                    projection_dim=1280, vocab_size=49408),
    ),
}


def tiny_tokenizer():
    """A CLIP tokenizer built in memory: the 256 byte symbols, their end-of-word forms and the two specials.

    Fewer symbols would map unknown letters to <|endoftext|>, which the text encoder pools on and breaks.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_sd(folder: Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write tokenizer, text encoder, VAE, UNet, scheduler and model_index.json to `folder`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size in FLUX_SIZES:
        from lorasmith.models.tiny_flux import build_flux

        return build_flux(folder, size, seed)
    spec = SIZES[size]
    if "text_2" in spec:
        return build_sdxl(folder, size, seed)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text = dict(spec["text"])
    text.setdefault("vocab_size", len(tokenizer))
    encoder = CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, hidden_act="quick_gelu",
                                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                           pad_token_id=tokenizer.pad_token_id, **text))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **spec["vae"])
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    return save_pipeline(folder, tokenizer, encoder, vae, unet, sd_scheduler())


def build_sdxl(folder: Path, size: str = "tiny-xl", seed: int = 0) -> Path:
    """An SDXL base folder: CLIP-L and OpenCLIP-bigG-shaped encoders (the second with its projection), the
    text_time UNet, CLIP's BPE tokenizers padded as SDXL's encoders were trained."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lorasmith.models.tokenizer import OPENCLIP_PAD, clip_tokenizer

    spec = SIZES[size]
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(OPENCLIP_PAD)
    torch.manual_seed(seed)
    common = dict(max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=1)
    encoder = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **common, **spec["text"]))
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", **common, **spec["text_2"]))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **spec["vae"])
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
    return save_pipeline(folder, tokenizer, encoder, vae, unet, sd_scheduler(), tokenizer_2, encoder_2)


def save_pipeline(folder: Path, tokenizer, encoder, vae, unet, scheduler, tokenizer_2=None, encoder_2=None) -> Path:
    """The parts as a StableDiffusion(XL)Pipeline folder that diffusers and train-lora load offline."""
    import diffusers

    folder.mkdir(parents=True, exist_ok=True)
    parts = [("tokenizer", tokenizer), ("text_encoder", encoder), ("vae", vae), ("unet", unet),
             ("scheduler", scheduler), ("tokenizer_2", tokenizer_2), ("text_encoder_2", encoder_2)]
    for name, part in parts:
        if part is not None:
            part.save_pretrained(folder / name)
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "image_encoder": [None, None], "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    if encoder_2 is not None:
        index.update({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers",
                      "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                      "force_zeros_for_empty_prompt": True})
        for key in ("safety_checker", "requires_safety_checker"):
            index.pop(key)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder


def main(argv: list[str] | None = None) -> int:
    from lorasmith.models.tiny_blip import model_cli
    from lorasmith.models.base import quiet_libraries

    quiet_libraries()
    return model_cli(argv, "python -m lorasmith.models.tiny", __doc__, {**SIZES, **FLUX_SIZES}, "model_index.json", build_sd,
                     "Stable Diffusion")


if __name__ == "__main__":
    raise SystemExit(main())
