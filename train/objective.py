"""The diffusion training objective: noise the latents at random timesteps, predict ε or v, weighted MSE."""

from __future__ import annotations


class Objective:
    def __init__(self, scheduler, min_snr_gamma: float = 0.0):
        self.scheduler, self.min_snr_gamma = scheduler, min_snr_gamma
        self.prediction = scheduler.config.prediction_type
        """epsilon or v_prediction: what the UNet predicts, and what the samplers configured from `scheduler` expect."""

    @property
    def timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def loss(self, unet, latents, inputs: dict, noise, steps):
        """Per-sample MSE of the prediction (ε or v) at `steps`, min-SNR-γ weighted when configured; `inputs` are
        the UNet's conditioning keywords (`Conditioner.unet_inputs`)."""
        import torch.nn.functional as F

        noisy = self.scheduler.add_noise(latents, noise, steps)
        prediction = unet(noisy, steps, **inputs).sample
        target = noise if self.prediction == "epsilon" else self.scheduler.get_velocity(latents, noise, steps)
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.min_snr_gamma:
            from diffusers.training_utils import compute_snr

            snr = compute_snr(self.scheduler, steps)
            weight = snr.clamp(max=self.min_snr_gamma) / (snr + 1 if self.prediction == "v_prediction" else snr)
            loss = loss * weight
        return loss


def noise_schedule(scheduler, model):
    """The base's noise schedule with the preset's prediction type, when it names one: the loss and the samplers
    (configured from this schedule) then agree."""
    wanted = "v_prediction" if model.v_parameterization else model.prediction_type
    if wanted in ("auto", scheduler.config.prediction_type):
        return scheduler
    return scheduler.from_config(scheduler.config, prediction_type=wanted)
