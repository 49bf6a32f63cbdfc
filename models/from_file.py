"""A base model given as one checkpoint file (A1111/ComfyUI layout), loaded offline.

Each part is built from the configs its own tensors imply (`single_file.py`) and filled by diffusers' own
converters; the tokenizer is CLIP's BPE shipped with lorasmith. A `.safetensors` file is read lazily, one
part's tensors at a time, so loading the VAE does not bring the UNet into memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lorasmith.models.single_file import CheckpointError, Family, detect_family, read_checkpoint, text_configs

CLIP_VOCAB = 49408


class _Shape:
    """What detection reads of a tensor, without reading it."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.ndim = len(self.shape)


class SafetensorsFile(Mapping):
    """Key → tensor of a `.safetensors` file, each read when asked for; `shapes()` costs no tensor read."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
        except Exception as error:  # safetensors has its own error type for a damaged header
            raise CheckpointError(f"{Path(path).name} is not a readable .safetensors file ({error}): "
                                  "download it again") from None
        self._keys = list(self._file.keys())

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys

    def shapes(self) -> dict:
        return {key: _Shape(self._file.get_slice(key).get_shape()) for key in self._keys}


def open_checkpoint(path: Path) -> tuple[Mapping, Mapping, Family]:
    """(tensors, shapes, family): tensors read on demand where the format allows; refuses what is no base model."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        tensors = SafetensorsFile(path)
        shapes = tensors.shapes()
    else:
        tensors = shapes = read_checkpoint(path)
    return tensors, shapes, detect_family(shapes, path.name)


def _fill(model, weights: dict, what: str, name: str):
    """Load converted weights into a model built without them; every weight must be there, in fp32 as from a
    diffusers folder (a fp16 file would otherwise train fp32 adapters on fp16 layers)."""
    import torch

    expected = model.state_dict()
    missing = [k for k in expected if k not in weights and not k.endswith("position_ids")]
    if missing:
        raise CheckpointError(f"{name}: the {what} lacks {len(missing)} weights (e.g. {missing[0]}); the file is "
                              "incomplete or of a layout lorasmith does not know")
    model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items() if k in expected}, strict=False,
                          assign=True)
    return model.eval()


def _build(cls, **config):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls(**config)


def load_text_encoder(tensors: Mapping, shapes: Mapping, family: Family, name: str):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    config = text_configs(shapes, family)[0]
    if config["vocab_size"] != CLIP_VOCAB:
        raise CheckpointError(f"{name}: its text encoder knows {config['vocab_size']} tokens, not CLIP's "
                              f"{CLIP_VOCAB}; pass it as a diffusers folder with its own tokenizer")
    model = _build(CLIPTextModel, config=CLIPTextConfig(**config))
    if family.name == "sd2":
        weights = convert_open_clip_checkpoint(model, tensors)
    else:
        weights = convert_ldm_clip_checkpoint(tensors)
    if not hasattr(model, "text_model"):  # transformers ≥ 5.6 dropped the wrapper
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    return _fill(model, weights, "text encoder", name)


def load_text_encoder_2(tensors: Mapping, shapes: Mapping, family: Family, name: str):
    """SDXL's second text encoder, OpenCLIP-bigG with its projection (the UNet takes its pooled output)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from lorasmith.models.single_file import XL_OPEN_CLIP

    model = _build(CLIPTextModelWithProjection, config=CLIPTextConfig(**text_configs(shapes, family)[1]))
    weights = convert_open_clip_checkpoint(model, tensors, prefix=XL_OPEN_CLIP)
    if not hasattr(model, "text_model"):
        weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
    return _fill(model, weights, "second text encoder", name)


def load_vae(tensors: Mapping, shapes: Mapping, name: str):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from lorasmith.models.single_file import vae_config

    model = _build(AutoencoderKL, **vae_config(shapes))
    return _fill(model, convert_ldm_vae_checkpoint(tensors, model.config), "VAE", name)


def load_unet(tensors: Mapping, shapes: Mapping, name: str):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from lorasmith.models.single_file import unet_config

    model = _build(UNet2DConditionModel, **unet_config(shapes))
    return _fill(model, convert_ldm_unet_checkpoint(tensors, model.config), "UNet", name)


def tokenizer_for(family: Family, second: bool = False):
    """CLIP's tokenizer padded as the family's encoder was trained: OpenCLIP (SD2.x, SDXL's second) with `!`."""
    from lorasmith.models.tokenizer import OPENCLIP_PAD, clip_tokenizer

    return clip_tokenizer(OPENCLIP_PAD if family.name == "sd2" or second else "<|endoftext|>")


def scheduler_for(family: Family):
    """SD's training noise schedule with the family's prediction type, rescaled to zero terminal SNR where the
    file says so."""
    scheduler = sd_scheduler()
    return scheduler.from_config(scheduler.config, prediction_type=family.prediction_type,
                                 rescale_betas_zero_snr=family.zero_terminal_snr)


def sd_scheduler():
    """SD1.x's training noise schedule (scaled-linear betas, epsilon prediction)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, prediction_type="epsilon", steps_offset=1)
