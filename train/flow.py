"""Rectified flow's training objective (Flux.1), in Kohya's `flux_train_network.py` conventions.

A picture's latents x and noise ε are mixed at σ ∈ (0, 1) as (1 − σ)·x + σ·ε, and the transformer predicts the
velocity ε − x (Kohya's `model_prediction_type = "raw"`). How σ is drawn decides which noise levels training
sees: `uniform`; `sigmoid` (σ = sigmoid(scale·n), n normal, x-flux's choice); `shift` (the sigmoid's σ pushed
towards noise by `discrete_flow_shift`: σ·s / (1 + (s − 1)·σ)); `flux_shift` (the resolution-dependent shift
BFL samples with: μ rises linearly from 0.5 at 256 patches to 1.15 at 4096, σ = e^μ / (e^μ + 1/σ − 1)).
"""

from __future__ import annotations

import math

SAMPLING = ("uniform", "sigmoid", "shift", "flux_shift")


def flux_mu(patches: int) -> float:
    """BFL's shift exponent for an image of `patches` 2×2 latent patches (`get_lin_function` in Kohya and BFL)."""
    slope = (1.15 - 0.5) / (4096 - 256)
    return 0.5 + slope * (patches - 256)


def shift_sigmas(sigmas, method: str, shift: float = 3.0, patches: int = 1024):
    """σ drawn uniformly or by the sigmoid, moved as `method` says (a pure function of its inputs)."""
    if method in ("uniform", "sigmoid"):
        return sigmas
    if method == "shift":
        return sigmas * shift / (1 + (shift - 1) * sigmas)
    if method == "flux_shift":
        mu = math.exp(flux_mu(patches))
        return mu / (mu + (1 / sigmas - 1))
    raise ValueError(f"unknown timestep sampling {method!r}; one of {', '.join(SAMPLING)}")


class FlowObjective:
    """The Objective of a flow-matching family: the same calls as objective.Objective, with timesteps σ·1000."""

    prediction = "flow"

    def __init__(self, scheduler, family, training):
        self.scheduler, self.family = scheduler, family
        self.method, self.scale = training.timestep_sampling, training.sigmoid_scale
        self.shift, self.guidance = training.discrete_flow_shift, training.guidance_scale

    @property
    def timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def draw(self, latents, generator):
        """σ·1000 per picture, drawn from `generator` on the CPU (the same on every device)."""
        import torch

        n = torch.randn(latents.shape[0], generator=generator)
        sigmas = torch.rand(latents.shape[0], generator=generator) if self.method == "uniform" else \
            torch.sigmoid(self.scale * n)
        patches = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
        return (shift_sigmas(sigmas, self.method, self.shift, patches) * self.timesteps).to(latents.device)

    def loss(self, model, latents, inputs: dict, noise, steps):
        """Per-sample MSE between the predicted and the true velocity ε − x at σ = steps / 1000; dev's guidance
        input is the preset's `guidance_scale`."""
        import torch
        import torch.nn.functional as F

        sigmas = (steps.float() / self.timesteps).view(-1, 1, 1, 1).to(latents.device)
        noisy = ((1 - sigmas) * latents.float() + sigmas * noise.float()).to(latents.dtype)
        if self.family.guided:
            inputs = {**inputs, "guidance": torch.full((latents.shape[0],), self.guidance, device=latents.device,
                                                       dtype=latents.dtype)}
        prediction = self.family.predict(model, noisy, steps, inputs)
        target = noise.float() - latents.float()
        return F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
