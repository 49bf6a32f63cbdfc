"""Preset keys a family cannot honour, refused in one sentence each before anything loads: on a flow-matching
family (Flux.1) those of UNet bases and ε/v-prediction schedules, elsewhere Flux's own network keys. Silently
ignoring them would train something else than the preset says."""

from __future__ import annotations

from lorasmith.train.schema import ConfigError


def check_flow_preset(family, config) -> None:
    """A ConfigError naming the first key that does not apply to `family`: UNet and ε/v keys on Flux, Flux's own
    network keys elsewhere."""
    if family.objective != "flow":
        for key, what in (("split_qkv", "fused q/k/v layers"), ("train_t5xxl", "T5-XXL")):
            if getattr(config.network, key):
                raise ConfigError(f"network.{key} is a Flux.1 setting; {family.label} has no {what}: remove the key")
        return
    from lorasmith.train.blocks import BLOCK_KEYS

    n, t, m, d = config.network, config.training, config.model, config.dataset
    label = family.label
    if d.bucket_reso_steps % 16:
        raise ConfigError(f"dataset.bucket_reso_steps = {d.bucket_reso_steps}: {label} packs latents into 2×2 "
                          "patches, so bucket sides must be multiples of 16 px: use 16, 32 or 64")
    if n.network_module != "lora":
        raise ConfigError(f'network.network_module = "{n.network_module}" is not available for {label} yet: use "lora"')
    if n.conv_dim:
        raise ConfigError(f"network.conv_dim = {n.conv_dim}: {label}'s transformer has no convolutions; set 0")
    for key in BLOCK_KEYS:
        if getattr(n, key) not in ([], "", None):
            raise ConfigError(f"network.{key} is a UNet block setting; {label} has double and single blocks, which "
                              "it does not describe: remove the key")
    if t.min_snr_gamma:
        raise ConfigError(f"training.min_snr_gamma = {t.min_snr_gamma:g} weights ε/v-prediction losses; {label} "
                          "trains by flow matching (training.timestep_sampling shapes its noise levels): set 0")
    if m.v_parameterization or m.prediction_type != "auto" or t.zero_terminal_snr is True:
        key = ("model.v_parameterization" if m.v_parameterization else "model.prediction_type"
               if m.prediction_type != "auto" else "training.zero_terminal_snr")
        raise ConfigError(f"{key} is for ε/v-prediction bases; {label} predicts a flow velocity: remove the key")
