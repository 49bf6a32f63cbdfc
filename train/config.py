"""The preset: a tree of typed dataclasses, read from TOML once, strictly, with errors that name the key.

Setting names follow Kohya's where a Kohya user would look for them (`network_dim`, `learning_rate`,
`clip_skip`, ...), so their knowledge carries over. Hyperparameters live here; runtime flags (device,
dry run) stay on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A preset that cannot be used; the message names the file and the key."""


@dataclass
class ModelConfig:
    pretrained_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Hub id or local diffusers folder. The old runwayml/stable-diffusion-v1-5 id is mapped to this one."""
    v_parameterization: bool = False
    """Only for v-prediction models (SD 2.x 768-v); normally read from the scheduler's config."""


@dataclass
class DatasetConfig:
    train_data_dir: str = ""
    """A Kohya training root of <repeats>_<tokens> folders, or a folder with metadata.jsonl."""
    reg_data_dir: str = ""
    prior_loss_weight: float = 1.0
    caption_extension: str = ".txt"
    resolution: int = 512
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    flip_aug: bool = False
    cache_latents: bool = True
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = True
    validation_split: float = 0.0
    """Fraction of the pictures held out of training to measure a validation loss each epoch (0 = none)."""


@dataclass
class NetworkConfig:
    network_dim: int = 64
    network_alpha: float = 32.0
    conv_dim: int = 0
    """Rank of LoCon adapters on the UNet's ResNet convolutions; 0 trains attention only."""
    conv_alpha: float = 1.0
    network_dropout: float = 0.0


@dataclass
class OptimizerConfig:
    optimizer_type: Literal["AdamW8bit", "AdamW", "Lion", "Prodigy", "Adafactor"] = "AdamW8bit"
    learning_rate: float = 1e-4
    unet_lr: float = 0.0
    """0 means learning_rate."""
    text_encoder_lr: float = 0.0
    """0 leaves the text encoder frozen (its outputs can then be cached)."""
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0


@dataclass
class ScheduleConfig:
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                          "polynomial"] = "cosine"
    lr_warmup_steps: float = 0.1
    """Below 1: a fraction of all steps; 1 or more: a number of steps."""
    lr_scheduler_num_cycles: int = 1


@dataclass
class TrainingConfig:
    max_train_epochs: int = 10
    max_train_steps: int = 0
    """0 means max_train_epochs decides."""
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    clip_skip: int = 1
    """Kohya's convention: 1 = last layer, 2 = penultimate layer (anime models)."""
    seed: int = 42
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0
    gradient_checkpointing: bool = False


@dataclass
class OutputConfig:
    output_dir: str = "output"
    output_name: str = "lora"
    save_precision: Literal["fp16", "bf16", "float"] = "fp16"
    save_every_n_epochs: int = 0
    save_state: bool = True
    """Write a resumable state (weights, optimizer, schedule, RNG, data position) with every epoch save."""
    save_state_every_n_steps: int = 0
    """Also write a state every N optimizer steps (0 = only with epoch saves and on SIGTERM/SIGINT)."""
    save_last_n_states: int = 2
    """States kept on disk; older ones are removed once a newer one is complete."""
    log_tensorboard: bool = True
    """TensorBoard event files beside loss.csv when the tensorboard package is installed."""
    trigger_phrase: str = ""
    """Written to modelspec.trigger_phrase so UIs can show it; defaults to the first folder's tokens."""


SAMPLERS = ("ddim", "pndm", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
            "dpmsingle", "ddpm", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a")


@dataclass
class SampleConfig:
    sample_prompts: str = ""
    """A prompts file in Kohya's format (one prompt a line, --n --w --h --d --l --s options, # comments)."""
    sample_every_n_epochs: int = 0
    sample_every_n_steps: int = 0
    sample_at_first: bool = False
    """Sample once before training, to see the base model's output beside the trained ones."""
    sample_sampler: Literal[SAMPLERS] = "ddim"  # type: ignore[valid-type]


@dataclass
class Config:
    config_version: int = CONFIG_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """`value` checked against the field type `kind`; ints are accepted where floats are expected."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        if value not in typing.get_args(kind):
            choices = ", ".join(map(repr, typing.get_args(kind)))
            raise ConfigError(f"{where} = {value!r} is not one of {choices}")
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool) and (type(value) is not kind):
        raise ConfigError(f"{where} = {value!r} must be {kind.__name__}, not {type(value).__name__}")
    return value


def _build(cls: type, data: dict, where: str) -> Any:
    hints = _hints(cls)
    unknown = [k for k in data if k not in hints]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, hints, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown key {where}{key}{hint} valid keys: {', '.join(hints)}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"[{name}] must be a table of settings")
            kwargs[name] = _build(kind, value, f"{name}.")
        else:
            kwargs[name] = _coerce(value, kind, f"{where}{name}")
    return cls(**kwargs)


def parse_value(text: str, kind: Any) -> Any:
    """A `--set key=value` value typed from its field: `true`, `2e-4`, `10`, or a plain string."""
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    return text


PATH_KEYS = (("dataset", "train_data_dir"), ("dataset", "reg_data_dir"), ("output", "output_dir"),
             ("model", "pretrained_model"), ("sample", "sample_prompts"))


def _absolute(value: str, base: Path, key: str) -> str:
    """Relative paths resolved against `base`; a model name stays a hub id unless such a folder exists."""
    if not value:
        return value
    candidate = base / Path(value).expanduser()
    if key == "pretrained_model" and not (value.startswith((".", "~", "/")) or candidate.exists()):
        return value
    return str(candidate.resolve())


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`section.key=value` strings merged into the raw TOML data before validation."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: write it as section.key=value, e.g. optimizer.learning_rate=2e-4")
        dotted, text = item.split("=", 1)
        section, key = dotted.strip().split(".", 1)
        hints = _hints(Config)
        if section not in hints or not dataclasses.is_dataclass(hints[section]):
            raise ConfigError(f"--set {dotted}: unknown section {section!r}; sections: "
                              f"{', '.join(k for k in hints if k != 'config_version')}")
        fields = _hints(hints[section])
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise ConfigError(f"--set {dotted}: unknown key{f'; did you mean {close[0]!r}?' if close else ''} "
                              f"valid keys: {', '.join(fields)}")
        kind = fields[key]
        kind = str if typing.get_origin(kind) is Literal else kind
        if (section, key) in PATH_KEYS:  # paths typed on the command line are relative to where it runs
            text = _absolute(text.strip(), Path.cwd(), key)
        try:
            data.setdefault(section, {})[key] = parse_value(text.strip(), kind)
        except ValueError as exc:
            raise ConfigError(f"--set {dotted}: {exc}") from None
    return data


def validate(config: Config) -> None:
    """Checks across keys and ranges that types alone cannot express."""
    t, n, d = config.training, config.network, config.dataset
    checks = [
        (config.config_version == CONFIG_VERSION, f"config_version must be {CONFIG_VERSION}"),
        (t.train_batch_size >= 1, "training.train_batch_size must be at least 1"),
        (t.gradient_accumulation_steps >= 1, "training.gradient_accumulation_steps must be at least 1"),
        (t.max_train_epochs >= 1 or t.max_train_steps >= 1, "training.max_train_epochs or max_train_steps must be set"),
        (t.clip_skip >= 1, "training.clip_skip counts from 1 (Kohya: 1 = last layer, 2 = penultimate)"),
        (n.network_dim >= 1, "network.network_dim must be at least 1"),
        (n.network_alpha > 0, "network.network_alpha must be positive"),
        (n.conv_dim >= 0, "network.conv_dim must be 0 (off) or a rank"),
        (d.resolution % 64 == 0 and d.resolution >= 64, "dataset.resolution must be a multiple of 64"),
        (0 <= d.caption_dropout_rate < 1, "dataset.caption_dropout_rate must lie in [0, 1)"),
        (d.keep_tokens >= 0, "dataset.keep_tokens must be 0 or more"),
        (config.optimizer.learning_rate > 0, "optimizer.learning_rate must be positive"),
        (0 <= d.validation_split < 1, "dataset.validation_split must lie in [0, 1), e.g. 0.1 holds out 10 %"),
        (config.output.save_last_n_states >= 1, "output.save_last_n_states must be at least 1"),
        (config.output.save_state_every_n_steps >= 0, "output.save_state_every_n_steps must be 0 (off) or more"),
        (config.sample.sample_every_n_epochs >= 0 and config.sample.sample_every_n_steps >= 0,
         "sample.sample_every_n_epochs and sample_every_n_steps must be 0 (off) or more"),
        (bool(d.train_data_dir), "dataset.train_data_dir is empty: point it at the folder prep-images wrote"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def load_config(path: Path, overrides: list[str] = ()) -> Config:
    """Read, override, type-check and validate a preset; relative paths in it are relative to the preset."""
    import toml

    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such preset file") from None
    except (toml.TomlDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    try:
        config = _build(Config, apply_overrides(data, list(overrides)), "")
        validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = path.resolve().parent
    for section, key in PATH_KEYS:
        holder = getattr(config, section)
        setattr(holder, key, _absolute(getattr(holder, key), base, key))
    _check_paths(config, path)
    return config


def _check_paths(config: Config, path: Path) -> None:
    train_dir = Path(config.dataset.train_data_dir)
    if not train_dir.is_dir():
        raise ConfigError(f"{path}: dataset.train_data_dir = {train_dir} is not a folder")
    reg = config.dataset.reg_data_dir
    if reg and not Path(reg).is_dir():
        raise ConfigError(f"{path}: dataset.reg_data_dir = {reg} is not a folder")
    prompts = config.sample.sample_prompts
    if prompts and not Path(prompts).is_file():
        raise ConfigError(f"{path}: sample.sample_prompts = {prompts} is not a file")


def to_toml(config: Config) -> str:
    import toml

    return toml.dumps(dataclasses.asdict(config))
