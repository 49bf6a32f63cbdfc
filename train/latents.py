"""Latents encoded once before training, in RAM or on disk, keyed so a stale one is never used.

A key covers the picture's content, its bucket size, whether it is flipped and the VAE's identity; a
changed picture or another VAE therefore misses the cache instead of training on old latents.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lorasmith.common.files import atomic_writer, make_output_folder


def vae_identity(vae) -> str:
    """sha256 over the VAE's config and weights: two VAEs share cached latents only if they are the same."""
    import torch

    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def latent_key(content: str, bucket: tuple[int, int], flip: bool, vae_id: str) -> str:
    return hashlib.sha256(f"{content}|{bucket[0]}x{bucket[1]}|{int(flip)}|{vae_id}".encode()).hexdigest()[:32]


class LatentCache:
    """A dict of latents, optionally backed by one safetensors file per key in `folder`."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.memory: dict = {}
        self.hits = self.misses = 0

    def get(self, key: str):
        if key in self.memory:
            return self.memory[key]
        if self.folder is not None and (path := self.folder / f"{key}.safetensors").is_file():
            from safetensors.torch import load_file

            self.memory[key] = load_file(path)["latent"]
            return self.memory[key]
        return None

    def put(self, key: str, latent) -> None:
        self.memory[key] = latent
        if self.folder is not None:
            from safetensors.torch import save

            make_output_folder(self.folder)
            with atomic_writer(self.folder / f"{key}.safetensors") as handle:
                handle.write(save({"latent": latent.contiguous()}))


def cache_latents(jobs, vae, cache: LatentCache, load, batch_size: int = 4, device="cpu", dtype=None,
                  progress: bool = True) -> None:
    """Encode the `(key, item, flip)` jobs the cache lacks, batched per bucket; `load(item, flip)` gives pixels."""
    import numpy as np
    import torch
    from tqdm import tqdm

    missing: dict[tuple, list] = {}
    for key, item, flip in jobs:
        if cache.get(key) is None:
            cache.misses += 1
            missing.setdefault(item.bucket, []).append((key, item, flip))
        else:
            cache.hits += 1
    todo = [group[i : i + batch_size] for group in missing.values() for i in range(0, len(group), batch_size)]
    scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0  # Flux's VAE is shifted too
    bar = tqdm(total=sum(map(len, todo)), desc="caching latents", unit="img", disable=not progress or not todo)
    for batch in todo:
        pixels = np.stack([np.asarray(load(item, flip), dtype=np.float32) for _, item, flip in batch])
        tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).div(127.5).sub(1.0).to(device, dtype or torch.float32)
        with torch.inference_mode():
            # The distribution's mode, not a sample: the same picture always gives the same latent, whatever
            # batch it was encoded in (the VAE's variance is tiny for SD's VAE).
            latents = (vae.encode(tensor).latent_dist.mode() - shift) * scale
        for (key, _, _), latent in zip(batch, latents):
            cache.put(key, latent.to("cpu", torch.float32).clone())
        bar.update(len(batch))
    bar.close()
