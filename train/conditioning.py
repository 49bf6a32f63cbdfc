"""Captions → the UNet's conditioning, for one base family: the text encoders, or the cache of their outputs
when they stay frozen, and the family's extra inputs (SDXL's pooled text and size/crop ids)."""

from __future__ import annotations

from lorasmith.train.schema import ConfigError
from lorasmith.train.dataset import crop_geometry

CACHE_BATCH = 16


class Conditioner:
    def __init__(self, family, tokenizers: list, clip_skip: int, device, dtype, max_tokens: int = 75):
        self.family, self.tokenizers, self.clip_skip = family, tokenizers, clip_skip
        self.max_tokens = max_tokens
        self.device, self.dtype = device, dtype
        self.encoders: list = []
        """The family's text encoders while they are in memory (trained, or not yet cached)."""
        self.cache: dict[str, dict] | None = None

    def encode(self, captions: list[str], grad: bool = False) -> dict:
        """The family's conditioning tensors for a batch of captions, with gradients only for a training step
        that trains the text encoders."""
        import torch

        with torch.enable_grad() if grad else torch.no_grad():
            return self.family.encode(self.tokenizers, self.encoders, captions, self.clip_skip, self.max_tokens)

    def fill_cache(self, captions: set[str]) -> None:
        """Encode every caption once, then let the encoders go: frozen, they would give the same tensors at every
        step."""
        ordered = sorted(captions)
        self.cache = {}
        for i in range(0, len(ordered), CACHE_BATCH):
            chunk = ordered[i : i + CACHE_BATCH]
            cond = self.encode(chunk)
            self.cache.update({caption: {k: v[j] for k, v in cond.items()} for j, caption in enumerate(chunk)})
        self.encoders = []

    def embed(self, captions: list[str], grad: bool = False) -> dict:
        """Conditioning from the cache when there is one; else from the encoders, with gradients for a training
        step (`grad`) or without for samples and validation."""
        import torch

        if self.cache is not None:
            return {key: torch.stack([self.cache[c][key] for c in captions]).to(self.device, self.dtype)
                    for key in self.cache[captions[0]]}
        return self.encode(captions, grad)

    def unet_inputs(self, cond: dict, items, flips) -> dict:
        """The UNet's keyword inputs for a batch: the conditioning and each picture's size and crop (which only
        some families use)."""
        geometry = [crop_geometry(i.size or i.bucket, i.bucket, f) for i, f in zip(items, flips)]
        return self.family.unet_inputs(cond, geometry)


def check_clip_skip(family, config, skip: int) -> None:
    """clip_skip against the family and the text encoder's depth, before anything is cached."""
    if family.clip_skip_note and skip > 1:
        which = family.clip_skip_note.split(" ", 1)[1]  # the note names the family first
        raise ConfigError(f"training.clip_skip = {skip} does not apply to {family.label}, which {which}: set 1")
    if skip > config.num_hidden_layers:
        raise ConfigError(f"training.clip_skip = {skip} is more than the {config.num_hidden_layers} layers of this "
                          "model's text encoder: use 1 (realistic models) or 2 (anime models)")
