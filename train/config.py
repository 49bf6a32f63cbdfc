"""The preset: a tree of typed dataclasses, read from TOML once, strictly, with errors that name the key.

Setting names follow Kohya's where a Kohya user would look for them (`network_dim`, `learning_rate`,
`clip_skip`, ...), so their knowledge carries over. Hyperparameters live here; runtime flags (device,
dry run) stay on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_VERSION = 1
MAX_SEED = 2**32 - 1
"""numpy's seed range, which accelerate's set_seed passes the seed to."""


class ConfigError(ValueError):
    """A preset that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take, checked once where the preset is read."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    hint: str = ""

    def holds(self, value: float) -> bool:
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '≥'} {self.low:g}"
        return (f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
                if self.low is not None else f"{'<' if self.high_open else '≤'} {self.high:g}")


def ranged(default, low=None, high=None, *, low_open=False, high_open=False, hint=""):
    """A dataclass field whose value must lie in the given range."""
    return field(default=default, metadata={"range": Range(low, high, low_open, high_open, hint)})


@dataclass
class ModelConfig:
    pretrained_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Hub id, local diffusers folder or single-file checkpoint (.safetensors, .ckpt) in the original layout.
    The old runwayml/stable-diffusion-v1-5 id is mapped to this one."""
    v_parameterization: bool = False
    """Kohya's switch for v-prediction models; the same as prediction_type = "v_prediction"."""
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    """auto: from the scheduler's config, or for a single file from its tensors (an SD2.x file without its
    training step reads as 768-v: set "epsilon" for SD2.x-base files)."""


@dataclass
class DatasetConfig:
    train_data_dir: str = ""
    """A Kohya training root of <repeats>_<tokens> folders, or a folder with metadata.jsonl."""
    reg_data_dir: str = ""
    prior_loss_weight: float = ranged(1.0, 0)
    caption_extension: str = ".txt"
    resolution: int = ranged(512, 64, 8192)
    min_bucket_reso: int = ranged(256, 64, 8192)
    max_bucket_reso: int = ranged(1024, 64, 8192)
    bucket_reso_steps: int = ranged(64, 8, 1024, hint="a multiple of 8: the VAE halves each side three times")
    shuffle_caption: bool = False
    keep_tokens: int = ranged(0, 0)
    caption_dropout_rate: float = ranged(0.0, 0, 1, high_open=True)
    flip_aug: bool = False
    cache_latents: bool = True
    cache_latents_to_disk: bool = False
    cache_text_encoder_outputs: bool = True
    validation_split: float = ranged(0.0, 0, 1, high_open=True, hint="e.g. 0.1 holds out 10 %")
    """Fraction of the pictures held out of training to measure a validation loss each epoch (0 = none)."""


@dataclass
class NetworkConfig:
    network_module: Literal["lora", "locon", "loha", "lokr", "dylora"] = "lora"
    """lora (with conv_dim: LoCon), locon (conv_dim defaults to network_dim), loha and lokr (LyCORIS' Hadamard
    and Kronecker products: more capacity per parameter), dylora (a LoRA whose first unit, 2·unit, … ranks
    each work alone: pick the rank after training with `lora resize`)."""
    network_dim: int = ranged(64, 1, 4096)
    network_alpha: float = ranged(32.0, 0, low_open=True)
    conv_dim: int = ranged(0, 0, 4096, hint="0 is off")
    """Rank of LoCon adapters on the UNet's ResNet convolutions; 0 trains attention only."""
    conv_alpha: float = ranged(1.0, 0, low_open=True)
    network_dropout: float = ranged(0.0, 0, 1, high_open=True)
    rank_dropout: float = ranged(0.0, 0, 1, high_open=True, hint="LoHa/LoKr only")
    module_dropout: float = ranged(0.0, 0, 1, high_open=True, hint="LoHa/LoKr only")
    factor: int = ranged(-1, -1, 4096, hint="LoKr only; -1 splits each side as evenly as it divides")
    unit: int = ranged(1, 1, 4096, hint="DyLoRA only")
    """DyLoRA: the step between the ranks it trains to work alone; network_dim (and conv_dim) are multiples."""
    use_tucker: bool = False
    """LoHa/LoKr: 3×3 convolutions in Tucker form (hada_t1/t2, lokr_t2), fewer parameters."""
    network_target: Literal["kohya", "attention"] = "kohya"
    """kohya: every Linear and 1×1 convolution in the UNet's transformer blocks, as Kohya's networks/lora.py and
    every civitai recipe assume; attention: the attention projections alone (the LoRA paper's choice)."""


@dataclass
class OptimizerConfig:
    optimizer_type: Literal["AdamW8bit", "AdamW", "Lion", "Prodigy", "Adafactor"] = "AdamW8bit"
    learning_rate: float = ranged(1e-4, 0, low_open=True)
    unet_lr: float = ranged(0.0, 0, hint="0 means learning_rate")
    """0 means learning_rate."""
    text_encoder_lr: float = ranged(0.0, 0, hint="0 leaves the text encoder frozen")
    """0 leaves the text encoder frozen (its outputs can then be cached)."""
    weight_decay: float = ranged(0.01, 0)
    max_grad_norm: float = ranged(1.0, 0, hint="0 turns clipping off")


@dataclass
class ScheduleConfig:
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts",
                          "polynomial"] = "cosine"
    lr_warmup_steps: float = ranged(0.1, 0, hint="below 1 a fraction of all steps, else a step count")
    """Below 1: a fraction of all steps; 1 or more: a number of steps."""
    lr_scheduler_num_cycles: int = ranged(1, 1, 1000)


@dataclass
class TrainingConfig:
    max_train_epochs: int = ranged(10, 0, 100_000)
    max_train_steps: int = ranged(0, 0, 100_000_000)
    """0 means max_train_epochs decides."""
    train_batch_size: int = ranged(1, 1, 4096)
    gradient_accumulation_steps: int = ranged(1, 1, 4096)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    clip_skip: int = ranged(1, 1, 48, hint="Kohya's convention: 1 = last layer, 2 = penultimate")
    """Kohya's convention: 1 = last layer, 2 = penultimate layer (anime models)."""
    seed: int = ranged(42, 0, MAX_SEED)
    noise_offset: float = ranged(0.0, 0, 1, hint="0.05-0.1 is usual")
    min_snr_gamma: float = ranged(0.0, 0, hint="0 is off; 5 is the paper's value")
    gradient_checkpointing: bool = False


@dataclass
class OutputConfig:
    output_dir: str = "output"
    output_name: str = "lora"
    save_precision: Literal["fp16", "bf16", "float"] = "fp16"
    save_every_n_epochs: int = ranged(0, 0)
    save_state: bool = True
    """Write a resumable state (weights, optimizer, schedule, RNG, data position) with every epoch save."""
    save_state_every_n_steps: int = ranged(0, 0)
    """Also write a state every N optimizer steps (0 = only with epoch saves and on SIGTERM/SIGINT)."""
    save_last_n_states: int = ranged(2, 1)
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
    sample_every_n_epochs: int = ranged(0, 0)
    sample_every_n_steps: int = ranged(0, 0)
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
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)  # `max_train_steps = 1e4` means 10000
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
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)  # 1e4
            except ValueError:
                value = math.nan
            if not value.is_integer():
                raise ValueError(f"expected a whole number, got {text!r}") from None
            return int(value)
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


def _check_ranges(config: Config) -> None:
    """Every number finite and inside its field's range."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for item in dataclasses.fields(values):
            value, key = getattr(values, item.name), f"{section.name}.{item.name}"
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key} = {value} must be a finite number")
            allowed = item.metadata.get("range")
            if allowed is not None and not allowed.holds(value):
                hint = f" ({allowed.hint})" if allowed.hint else ""
                raise ConfigError(f"{key} = {value!r} is out of range: it must be {allowed}{hint}")


def _name_problem(name: str) -> str | None:
    """Why `output.output_name` cannot name the run's files, or None."""
    from lorasmith.prep.layout import safe_stem

    if not name.strip():
        return "is empty: it names the LoRA file, e.g. output_name = \"claymation-style\""
    if safe_stem(name) != unicodedata.normalize("NFC", name):
        return (f"cannot be a file name (no path separators, leading dots or <>:\"\\|?*, at most 200 bytes); "
                f"e.g. {safe_stem(name)!r}")
    return None


def validate(config: Config) -> None:
    """Ranges of every number, then the checks across keys that ranges cannot express."""
    from lorasmith.prep.sidecar import caption_extension
    from lorasmith.train.plan import bucket_resolutions

    _check_ranges(config)
    t, d, o, n = config.training, config.dataset, config.output, config.network
    checks = [
        (config.config_version == CONFIG_VERSION, f"config_version must be {CONFIG_VERSION}"),
        (t.max_train_epochs >= 1 or t.max_train_steps >= 1, "training.max_train_epochs or max_train_steps must be set"),
        (d.resolution % 64 == 0, "dataset.resolution must be a multiple of 64"),
        (d.bucket_reso_steps % 8 == 0, "dataset.bucket_reso_steps must be a multiple of 8"),
        (d.min_bucket_reso <= d.resolution <= d.max_bucket_reso,
         f"dataset.resolution = {d.resolution} must lie between dataset.min_bucket_reso = {d.min_bucket_reso} and "
         f"max_bucket_reso = {d.max_bucket_reso} (Kohya's rule: buckets range around the resolution)"),
        (bool(d.train_data_dir), "dataset.train_data_dir is empty: point it at the folder prep-images wrote"),
        (bool(config.model.pretrained_model.strip()), "model.pretrained_model is empty: give a hub id, a folder or a checkpoint file"),
        (n.network_module in ("lora", "locon", "dylora") or not n.network_dropout,
         f"network.network_dropout applies to lora, locon and dylora; {n.network_module} uses "
         "network.rank_dropout and network.module_dropout"),
        (n.network_module in ("loha", "lokr") or not (n.rank_dropout or n.module_dropout),
         f"network.rank_dropout and module_dropout apply to loha and lokr; {n.network_module} uses "
         "network.network_dropout"),
        (n.network_module == "lokr" or n.factor == -1, "network.factor applies to lokr only"),
        (n.network_module == "dylora" or n.unit == 1, "network.unit applies to dylora only"),
        (n.network_dim % n.unit == 0 and n.conv_dim % n.unit == 0,
         f"network.network_dim = {n.network_dim}{f' and conv_dim = {n.conv_dim}' if n.conv_dim else ''} must be "
         f"multiples of network.unit = {n.unit}"),
        (not (config.model.v_parameterization and config.model.prediction_type == "epsilon"),
         'model.v_parameterization = true contradicts model.prediction_type = "epsilon": keep one'),
        (bool(o.output_dir.strip()), "output.output_dir is empty: give the folder the LoRA goes to"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    problem = _name_problem(o.output_name)
    if problem:
        raise ConfigError(f"output.output_name = {o.output_name!r} {problem}")
    try:
        d.caption_extension = caption_extension(d.caption_extension, "dataset.caption_extension =")
        bucket_resolutions(d.resolution, d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load_config(path: Path, overrides: list[str] = ()) -> Config:
    """Read, override, type-check and validate a preset; relative paths in it are relative to the preset."""
    import toml

    try:
        text = path.read_text(encoding="utf-8-sig")  # Windows editors put a byte-order mark first
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such preset file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder: give the preset file, e.g. presets/sd15-style.toml") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the preset as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = toml.loads(text)
    except (toml.TomlDecodeError, ValueError, IndexError, TypeError) as exc:
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
    if prompts:
        from lorasmith.prep.sidecar import SidecarError, decode_text

        try:
            decode_text(Path(prompts).read_bytes())
        except (SidecarError, OSError) as exc:
            raise ConfigError(f"{path}: sample.sample_prompts = {prompts} {exc}") from None


def to_toml(config: Config) -> str:
    import toml

    return toml.dumps(dataclasses.asdict(config))
