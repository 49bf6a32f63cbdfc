"""What a single-file Stable Diffusion checkpoint in the original layout is, worked out from its tensors alone.

A1111, ComfyUI and CivitAI share models as one `.safetensors`/`.ckpt` in the CompVis/SGM layout
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` or `conditioner.embedders.*`). diffusers'
`from_single_file` fetches each part's config from the Hub; here, as in ComfyUI's `model_detection.py`, the family
and the diffusers configs come from key names and shapes, so this works offline and for any size of model.
diffusers' own converters (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`) then rename the weights into models built from these configs.

Some settings live in no shape and follow the families' conventions (see `_unet_heads`, `_text_heads`, `_groups`):
a model built otherwise still loads, with the right weights, but computes differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

UNET = "model.diffusion_model."
CLIP_L = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
"""SD1.x's CLIP-L; the second form is from files written before transformers added the `text_model` level."""
OPEN_CLIP = "cond_stage_model.model."
XL_CLIP_L = ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.0.transformer.")
XL_OPEN_CLIP = "conditioner.embedders.1.model."
REFINER_OPEN_CLIP = "conditioner.embedders.0.model."
SDXL_SCALING_FACTOR = 0.13025
"""SDXL's VAE latent scale (its diffusers config); SD1.x/2.x use diffusers' LDM_VAE_DEFAULT_SCALING_FACTOR."""
SD2_EPSILON_STEP = 875000
"""diffusers' rule: an SD2 file is v-prediction unless its global_step is SD2-base's final 875000."""
LABELS = {("sd1", "epsilon"): "SD1.x", ("sd1", "v_prediction"): "SD1.x (v-prediction)",
          ("sd2", "epsilon"): "SD2.x", ("sd2", "v_prediction"): "SD2.x (v-prediction)",
          ("sdxl", "epsilon"): "SDXL base", ("sdxl", "v_prediction"): "SDXL base (v-prediction)"}


class CheckpointError(ValueError):
    """A checkpoint lorasmith cannot train on; the message is one sentence naming the file and the fix."""


@dataclass(frozen=True)
class Family:
    name: str
    """One of sd1, sd2, sdxl."""
    prediction_type: str
    """epsilon or v_prediction: what the UNet was trained to predict, so what the loss must target."""
    label: str
    """For the plan: "SD1.x", "SD2.x (v-prediction)", "SDXL base"."""
    marked: bool = False
    """The file declares its prediction type (ComfyUI's `v_pred` key) rather than leaving it to a rule."""
    zero_terminal_snr: bool = False
    """The file declares a zero-terminal-SNR schedule (the `ztsnr` key, as NoobAI-XL v-pred carries)."""


def _single_file_utils():
    from diffusers.loaders import single_file_utils

    return single_file_utils


def _torch_load(path: Path):
    """Memory-mapped where the format allows (torch's zip format), so a run that loads its parts one at a time
    reads only the tensors each part uses; the legacy format is read whole."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error).lower() and "zip" not in str(error).lower():
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors by original key. A `.ckpt` is unpickled with weights_only, so a file that needs code to
    load is refused rather than run; its `global_step`, which the v-prediction rule reads, is kept as a tensor."""
    import torch

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own error type for a damaged header
            raise CheckpointError(f"{path.name} is not a readable .safetensors file ({error}): "
                                  "download it again") from error
    try:
        data = _torch_load(path)
    except Exception as error:
        if "Unsupported global" in str(error):
            raise CheckpointError(
                f"{path.name} holds Python objects besides tensors; lorasmith never unpickles code: convert it to "
                ".safetensors (e.g. in ComfyUI or with diffusers) and pass that") from None
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint ({type(error).__name__}): "
                              "download it again or pass its .safetensors version") from None
    step = data.get("global_step") if isinstance(data, dict) else None
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} holds a {type(data).__name__}, not a dict of tensors: "
                              "pass a Stable Diffusion checkpoint")
    state = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if isinstance(step, int) and "global_step" not in state:
        state["global_step"] = torch.tensor(step)
    return state


def _has(state: dict, prefixes) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
    return any(key.startswith(prefixes) for key in state)


def _kind(state: dict) -> str | None:
    """The family by its text encoders, as ComfyUI and diffusers tell them apart: CLIP-L alone (SD1.x), OpenCLIP-H
    (SD2.x), CLIP-L beside OpenCLIP-bigG (SDXL base)."""
    if _has(state, XL_OPEN_CLIP) and _has(state, XL_CLIP_L):
        return "sdxl"
    if _has(state, OPEN_CLIP):
        return "sd2"
    if _has(state, CLIP_L):
        return "sd1"
    return None


def _prediction(state: dict, kind: str | None) -> str:
    """diffusers' rule (SD2.x is v-prediction unless global_step says SD2-base) and ComfyUI's `v_pred` marker key,
    which converters put in v-prediction files of any family."""
    if "v_pred" in state:
        return "v_prediction"
    if kind == "sd2":
        step = state.get("global_step")
        return "epsilon" if step is not None and int(step) == SD2_EPSILON_STEP else "v_prediction"
    return "epsilon"


def detect_family(state: dict, name: str) -> Family:
    """SD1.x, SD2.x or SDXL base with its prediction type; anything else is refused by a sentence saying what to
    pass instead, before any model is built."""
    full = "the full checkpoint (UNet, VAE and text encoder in one file) or a diffusers folder"
    if not _has(state, UNET):
        if any("lora" in key.lower() for key in state):
            raise CheckpointError(f"{name} is a LoRA (lora_* keys), not a base model: pass the base checkpoint it "
                                  "was trained on instead")
        if _kind(state) is None and any(key.endswith("encoder.conv_in.weight") for key in state):
            raise CheckpointError(f"{name} holds only a VAE: pass {full} instead")
        raise CheckpointError(f"{name} has no UNet (no {UNET}* keys): pass {full} instead")
    conv_in = state.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None or conv_in.ndim != 4:
        raise CheckpointError(f"{name} is not an SD1.x, SD2.x or SDXL UNet (SD3, Flux or another architecture): "
                              "pass one of those")
    if conv_in.shape[1] != 4:
        what = "an inpainting model" if conv_in.shape[1] == 9 else f"a UNet taking {conv_in.shape[1]} input channels"
        raise CheckpointError(f"{name} is {what}, not a text-to-image base: pass the plain model it was made from")
    if _has(state, REFINER_OPEN_CLIP) and not _has(state, XL_OPEN_CLIP):
        raise CheckpointError(f"{name} is an SDXL refiner, which LoRAs are not trained on: pass the SDXL base model")
    kind = _kind(state)
    if kind is None:
        raise CheckpointError(f"{name} has a UNet but no text encoder (a UNet-only export): pass {full} instead")
    if _vae_prefix(state) is None:
        raise CheckpointError(f"{name} has no VAE (no first_stage_model.* keys): pass a checkpoint with its VAE "
                              "baked in, or a diffusers folder")
    prediction = _prediction(state, kind)
    zero_snr = "ztsnr" in state
    label = LABELS[kind, prediction]
    if zero_snr:
        label = label.removesuffix(")") + ", zero terminal SNR)" if label.endswith(")") else f"{label} (zero terminal SNR)"
    return Family(kind, prediction, label, "v_pred" in state, zero_snr)


def _sub(state: dict, prefix: str) -> dict:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def _indices(keys, pattern: str) -> list[int]:
    """The numbers `{n}` that `pattern` (a regex with one group) takes in `keys`, sorted."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for m in map(rx.fullmatch, keys) if m})


def _depth(unet: dict, block: str) -> int:
    """Transformer layers in an LDM block (`input_blocks.4.1`); 0 where the block has no attention."""
    return len(_indices(unet, re.escape(block) + r"\.transformer_blocks\.(\d+)\.attn2\.to_k\.weight"))


def _groups(widths) -> int:
    """GroupNorm's group count is in no shape. Every released SD model uses 32; narrower test models (lorasmith's
    tiny and toy: 16 groups over 32 channels, 8 over 16) keep two channels a group, so: the largest count ≤
    min(32, narrowest / 2) that divides every width."""
    groups = max(1, min(32, min(widths) // 2))
    while any(w % groups for w in widths):
        groups -= 1
    return groups


def _unet_heads(widths: list[int], linear: bool, context: int):
    """Head counts are in no shape (q, k and v are one width×width matrix each), so they follow the families:
    SD2.x/SDXL (Linear proj_in) use 64-wide heads, which diffusers' configs list as heads per block
    ([5, 10, 20, 20], [5, 10, 20]); SD1.x (1×1 conv proj_in) uses 8 heads everywhere. Narrow conv models keep
    heads no more than context/8 of them (lorasmith's tiny: 4 over a 32-wide context; toy: 8 over 64)."""
    if linear:
        return [max(1, w // 64) for w in widths]
    return max(1, min(8, context // 8))


def _text_heads(hidden: int) -> int:
    """64-wide heads as in CLIP-L (12), OpenCLIP-H (16) and bigG (20); at least 4, as the narrow test towers have."""
    return max(4, hidden // 64)


def _image_size(state: dict) -> int:
    """The resolution the family was trained at, from diffusers' table: 512 for SD1.x and SD2-base, 768 for SD2
    v-prediction (768-v), 1024 for SDXL."""
    sizes = _single_file_utils().DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP
    kind = _kind(state)
    if kind == "sdxl" or UNET + "label_emb.0.0.weight" in state:
        return sizes["xl_base"]
    if kind == "sd2" and _prediction(state, kind) == "v_prediction":
        return sizes["v2"]
    return sizes["v1"]


def unet_config(state: dict) -> dict:
    """UNet2DConditionModel kwargs: levels and widths from the resnets, attention placement and depth from the
    transformer blocks, context width from attn2.to_k, SDXL's text_time embedding from label_emb."""
    unet = _sub(state, UNET)
    levels, current = [], []
    for n in _indices(unet, r"input_blocks\.(\d+)\..*")[1:]:
        if f"input_blocks.{n}.0.op.weight" in unet:
            levels.append(current)
            current = []
        else:
            current.append(n)
    levels += [current] if current else []
    per_level = len(levels[0])
    widths = [unet[f"input_blocks.{level[0]}.0.out_layers.3.weight"].shape[0] for level in levels]
    down = [_depth(unet, f"input_blocks.{level[0]}.1") for level in levels]
    up = [_depth(unet, f"output_blocks.{i * (per_level + 1)}.1") for i in range(len(levels))]
    to_k = next(v for k, v in unet.items() if k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in unet.items() if k.endswith(".proj_in.weight"))
    depths = [d or 1 for d in down]
    config = dict(
        sample_size=_image_size(state) // _vae_scale(state),
        in_channels=unet["input_blocks.0.0.weight"].shape[1], out_channels=unet["out.2.weight"].shape[0],
        block_out_channels=widths, layers_per_block=per_level,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up],
        mid_block_type="UNetMidBlock2DCrossAttn" if _depth(unet, "middle_block.1") else "UNetMidBlock2D",
        cross_attention_dim=to_k.shape[1], use_linear_projection=proj_in.ndim == 2,
        attention_head_dim=_unet_heads(widths, proj_in.ndim == 2, to_k.shape[1]),
        transformer_layers_per_block=depths[0] if len(set(depths)) == 1 else depths,
        norm_num_groups=_groups(widths),
    )
    if _kind(state) == "sd2":
        config["upcast_attention"] = True  # as diffusers' from_single_file (SD2.1's config) runs every SD2 file
    if "label_emb.0.0.weight" in unet:
        config.update(addition_embed_type="text_time", addition_time_embed_dim=_time_embed_dim(state),
                      projection_class_embeddings_input_dim=unet["label_emb.0.0.weight"].shape[1])
    return config


def _time_embed_dim(state: dict) -> int:
    """SDXL's label_emb takes the pooled bigG embedding and six sinusoidal size/crop numbers, 256 wide each in SDXL:
    (input width − pooled width) / 6 when the text encoder is there to say the pooled width."""
    adm = state[UNET + "label_emb.0.0.weight"].shape[1]
    projection = state.get(XL_OPEN_CLIP + "text_projection")
    if projection is not None and adm > projection.shape[1] and (adm - projection.shape[1]) % 6 == 0:
        return (adm - projection.shape[1]) // 6
    return 256


def _vae_prefix(state: dict) -> str | None:
    for prefix in (*_single_file_utils().LDM_VAE_KEYS, ""):
        if prefix + "encoder.conv_in.weight" in state:
            return prefix
    return None


def _vae_scale(state: dict) -> int:
    """Pixels per latent: the VAE halves the image at every level but the last (8 for SD's four)."""
    prefix = _vae_prefix(state)
    if prefix is None:
        return 8
    return 2 ** (len(_indices(state, re.escape(prefix) + r"encoder\.down\.(\d+)\..*")) - 1)


def vae_config(state: dict) -> dict:
    """AutoencoderKL kwargs from the encoder's levels and the latent width; the latent scale is the family's."""
    prefix = _vae_prefix(state)
    if prefix is None:
        raise CheckpointError("the checkpoint has no VAE (no first_stage_model.* keys): pass one with its VAE baked in")
    vae = _sub(state, prefix)
    levels = _indices(vae, r"encoder\.down\.(\d+)\..*")
    widths = [vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    sfu = _single_file_utils()
    return dict(
        in_channels=vae["encoder.conv_in.weight"].shape[1], out_channels=vae["decoder.conv_out.weight"].shape[0],
        down_block_types=["DownEncoderBlock2D"] * len(widths), up_block_types=["UpDecoderBlock2D"] * len(widths),
        block_out_channels=widths, layers_per_block=len(_indices(vae, r"encoder\.down\.0\.block\.(\d+)\..*")),
        latent_channels=vae["decoder.conv_in.weight"].shape[1], norm_num_groups=_groups(widths),
        sample_size=_image_size(state),
        scaling_factor=SDXL_SCALING_FACTOR if _kind(state) == "sdxl" else sfu.LDM_VAE_DEFAULT_SCALING_FACTOR,
        use_quant_conv="quant_conv.weight" in vae, use_post_quant_conv="post_quant_conv.weight" in vae,
        mid_block_add_attention=any(k.startswith("encoder.mid.attn_1.") for k in vae),
    )


def _clip_config(state: dict, prefixes: tuple[str, ...]) -> dict:
    """CLIP-L in transformers' layout, as SD1.x and SDXL's first encoder store it. The file has no projection, so
    projection_dim is the width (CLIP-L's 768), as in diffusers' configs."""
    prefix = next(p for p in prefixes if p + "embeddings.token_embedding.weight" in state)
    tower = _sub(state, prefix)
    vocab, hidden = tower["embeddings.token_embedding.weight"].shape
    return _text(vocab, hidden, tower["embeddings.position_embedding.weight"].shape[0],
                 len(_indices(tower, r"encoder\.layers\.(\d+)\.mlp\.fc1\.weight")),
                 tower["encoder.layers.0.mlp.fc1.weight"].shape[0], "quick_gelu", hidden)


def _open_clip_config(state: dict, prefix: str) -> dict:
    """OpenCLIP (SD2.x's H, SDXL's bigG) with the layers diffusers' `convert_open_clip_checkpoint` keeps: it drops
    SD2's last block (the one SD2 never reads: 24 in the file, 23 in the model); bigG keeps all 32."""
    ignored = set(_single_file_utils().SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)
    tower = _sub(state, prefix)
    vocab, hidden = tower["token_embedding.weight"].shape
    layers = [n for n in _indices(tower, r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.weight")
              if f"{prefix}transformer.resblocks.{n}.mlp.c_fc.weight" not in ignored]
    projection = tower.get("text_projection")
    return _text(vocab, hidden, tower["positional_embedding"].shape[0], len(layers),
                 tower["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], "gelu",
                 projection.shape[1] if projection is not None else hidden)


def _text(vocab, hidden, positions, layers, intermediate, act, projection) -> dict:
    """CLIPTextConfig kwargs. Token ids as in every SD text_encoder config: eos 2 selects transformers' legacy pooling
    (at the highest token id, CLIP's end token), which also works for vocabularies other than CLIP's 49408."""
    return dict(vocab_size=int(vocab), hidden_size=int(hidden), intermediate_size=int(intermediate),
                num_hidden_layers=layers, num_attention_heads=_text_heads(int(hidden)),
                max_position_embeddings=int(positions), hidden_act=act, projection_dim=int(projection),
                bos_token_id=0, eos_token_id=2, pad_token_id=1)


def text_configs(state: dict, family: Family) -> list[dict]:
    """CLIPTextConfig kwargs per text encoder, in diffusers' order: SDXL's second is for
    CLIPTextModelWithProjection, whose pooled output SDXL's UNet takes."""
    if family.name == "sdxl":
        return [_clip_config(state, XL_CLIP_L), _open_clip_config(state, XL_OPEN_CLIP)]
    if family.name == "sd2":
        return [_open_clip_config(state, OPEN_CLIP)]
    return [_clip_config(state, CLIP_L)]
