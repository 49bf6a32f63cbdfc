"""The model as it is now, seen two ways between steps: the validation loss over held-out pictures and sample
pictures from the sample prompts.

Neither touches training's random numbers (validation draws from its own fixed generator, samples run inside a
forked RNG), so a run with them trains the same weights as one without.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def evaluating(models):
    """Models in eval mode (adapter dropout off) for the block, then back in the mode each was in."""
    modes = [(m, m.training) for m in models]
    for model, _ in modes:
        model.eval()
    try:
        yield
    finally:
        for model, mode in modes:
            model.train(mode)


class Previews:
    def __init__(self, accelerator, device, conditioner, objective, latents, vae, family, sampler: str, seed: int,
                 batch: int = 1):
        """`latents(items, flips)` gives the batch's latents; `vae` may be None when there are no prompts; the
        validation loss runs at most `batch` timesteps at once (the training batch: what the card already holds)."""
        self.accelerator, self.device, self.batch = accelerator, device, batch
        self.conditioner, self.objective, self.latents = conditioner, objective, latents
        self.vae, self.family, self.sampler, self.seed = vae, family, sampler, seed

    def validation_loss(self, unet, items) -> float:
        """Mean loss over `items` at validation.py's fixed timesteps with fixed noise, so epochs compare."""
        import torch

        from lorasmith.train.validation import NOISE_SEED, TIMESTEPS

        generator = torch.Generator().manual_seed(NOISE_SEED)
        total, count, n = 0.0, 0, len(TIMESTEPS)
        with torch.no_grad(), self.accelerator.autocast():
            for item in sorted(items, key=lambda i: str(i.image)):
                latent = self.latents([item], [False])[0]
                latents = latent.unsqueeze(0).expand(n, *latent.shape)
                noise = torch.randn(latents.shape, generator=generator).to(self.device, latents.dtype)
                cond = {k: v.expand(n, *v.shape[1:]) for k, v in self.conditioner.embed([item.caption]).items()}
                steps = torch.tensor(TIMESTEPS, device=self.device)
                for start in range(0, n, self.batch):
                    part = slice(start, start + self.batch)
                    size = len(steps[part])
                    inputs = self.conditioner.unet_inputs({k: v[part] for k, v in cond.items()}, [item] * size,
                                                          [False] * size)
                    total += float(self.objective.loss(unet, latents[part], inputs, noise[part], steps[part]).sum())
                count += n
        return total / max(1, count)

    def pictures(self, unet, prompts) -> list:
        """One picture per prompt (its own seed, or the run's seed + its index), on any device the same."""
        import torch

        from PIL import Image

        from lorasmith.models.sampling import NonFinitePicture

        images = []
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), self.accelerator.autocast():
            for i, prompt in enumerate(prompts):
                scheduler = self.family.sampler(prompt.sampler or self.sampler, self.objective.scheduler.config)
                positive = self.conditioner.embed([prompt.prompt])
                negative = self.conditioner.embed([prompt.negative])
                seed = prompt.seed if prompt.seed is not None else self.seed + i
                try:
                    images.append(self.family.render(unet, self.vae, scheduler, positive, negative, prompt, seed,
                                                     self.device))
                except NonFinitePicture:  # a sample must not end the run: grey, which no model draws by chance
                    images.append(Image.new("RGB", (prompt.width, prompt.height), (128, 128, 128)))
        return images
