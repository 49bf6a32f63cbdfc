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

    def draw(self, latents, generator):
        """A timestep per picture, uniform over the schedule, drawn from `generator` on the CPU."""
        import torch

        return torch.randint(0, self.timesteps, (latents.shape[0],), generator=generator).to(latents.device)

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


def make_objective(family, parts, model, training, base: str = "the base model"):
    """(objective, note): flow matching for a flow family (train/flow.py), else ε/v-prediction under the base's
    noise schedule as `noise_schedule` resolves it against what the base declares; `note` is for the plan."""
    if family.objective == "flow":
        from lorasmith.train.flow import FlowObjective

        return FlowObjective(parts.scheduler, family, training), ""
    from lorasmith.models.base import declared_schedule

    schedule, note = noise_schedule(parts.scheduler, model, training, declared_schedule(parts), base)
    return Objective(schedule, training.min_snr_gamma), note


def noise_schedule(scheduler, model, training, declared=None, base: str = "the base model"):
    """(schedule, note): the base's noise schedule with the preset's prediction type and zero-terminal-SNR choice,
    so the loss and the samplers (configured from this schedule) agree. `declared` (models.base.Declared) is
    what the base says of itself: "auto" follows it, a preset that contradicts it is refused (training a
    v-prediction base for ε, as Kohya does without --v_parameterization, turns its pictures blank), and `note`
    says what was decided and why, for the plan."""
    from lorasmith.train.schema import ConfigError

    said = declared.prediction_type if declared is not None else None
    said_snr = declared.zero_terminal_snr if declared is not None else None
    source = f"{base} declares it ({declared.source})" if declared is not None and declared.source else ""
    wanted = "v_prediction" if model.v_parameterization else model.prediction_type
    if wanted == "epsilon" and said == "v_prediction":
        raise ConfigError(f'model.prediction_type = "epsilon" contradicts {base}, a v-prediction model '
                          f'({declared.source}): training it for ε would turn its pictures blank; remove the key')
    prediction = scheduler.config.prediction_type if wanted == "auto" else wanted
    zero = training.zero_terminal_snr
    if zero is False and said_snr:
        raise ConfigError(f"training.zero_terminal_snr = false contradicts {base}, which has a zero-terminal-SNR "
                          f"schedule ({declared.source}): remove the key")
    rescale = bool(scheduler.config.get("rescale_betas_zero_snr", False)) if zero == "auto" else bool(zero)
    if rescale and prediction != "v_prediction":
        raise ConfigError("training.zero_terminal_snr needs v-prediction (at its last step there is no picture "
                          f'left, so ε-prediction has nothing to learn); {base} is ε-prediction: set '
                          'model.prediction_type = "v_prediction" or training.zero_terminal_snr = false')
    notes = []
    if prediction == "v_prediction":
        notes.append("v-prediction" + (f", as {source}" if wanted == "auto" and source and said else
                                       " (the preset)" if wanted != "auto" else ""))
    if rescale:
        notes.append("zero terminal SNR" + (f", as {source}" if zero == "auto" and source else " (the preset)"
                                            if zero is True else ""))
    changed = {}
    if prediction != scheduler.config.prediction_type:
        changed["prediction_type"] = prediction
    if rescale != bool(scheduler.config.get("rescale_betas_zero_snr", False)):
        changed["rescale_betas_zero_snr"] = rescale
    if changed:
        scheduler = scheduler.from_config(scheduler.config, **changed)
    return scheduler, "; ".join(notes)
