"""The preset read from TOML once, strictly, into the schema's dataclasses (`schema.py`), with errors that name
the key and the file; `--set section.key=value` overrides typed from the schema; the resolved preset written
back as TOML."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import unicodedata
from pathlib import Path
from typing import Any, Literal

from lorasmith.train.schema import (  # noqa: F401  (the schema is read through this module)
    CONFIG_VERSION, MAX_SEED, ConfigError, Range, ranged, ModelConfig, DatasetConfig, NetworkConfig, OptimizerConfig, ScheduleConfig, TrainingConfig, OutputConfig, SAMPLERS, SampleConfig, Config,
)

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _choices(kind: Any) -> tuple[Any, ...]:
    """The field types of a union (`bool | Literal["auto"]`), or the type itself."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return typing.get_args(kind)
    return (kind,)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """`value` checked against the field type `kind`; ints are accepted where floats are expected."""
    if len(_choices(kind)) > 1:
        for choice in _choices(kind):
            try:
                return _coerce(value, choice, where)
            except ConfigError:
                pass
        shown = " or ".join(repr(a) if typing.get_origin(c) is Literal else c.__name__
                            for c in _choices(kind) for a in (typing.get_args(c) or (None,)))
        raise ConfigError(f"{where} = {value!r} must be {shown}")
    origin = typing.get_origin(kind)
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in typing.get_args(kind)):
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
    if len(_choices(kind)) > 1:
        for choice in _choices(kind):
            try:
                return parse_value(text, choice)
            except ValueError:
                pass
        return text
    if typing.get_origin(kind) is Literal:
        kinds = {type(a) for a in typing.get_args(kind)}
        if kinds == {int}:
            return parse_value(text, int)
        if text not in typing.get_args(kind):
            raise ValueError(f"expected one of {', '.join(map(repr, typing.get_args(kind)))}, got {text!r}")
        return text
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
             ("model", "pretrained_model"), ("sample", "sample_prompts"), ("model", "clip_l"), ("model", "t5xxl"),
             ("model", "ae"), ("model", "t5_tokenizer"))


def _absolute(value: str, base: Path, key: str) -> str:
    """Relative paths resolved against `base`; a model name stays a hub id unless such a folder exists."""
    if not value:
        return value
    candidate = base / Path(value).expanduser()
    if key in ("pretrained_model", "t5_tokenizer") and not (value.startswith((".", "~", "/")) or candidate.exists()):
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
    from lorasmith.common.layout import safe_stem

    if not name.strip():
        return "is empty: it names the LoRA file, e.g. output_name = \"claymation-style\""
    if safe_stem(name) != unicodedata.normalize("NFC", name):
        return (f"cannot be a file name (no path separators, leading dots or <>:\"\\|?*, at most 200 bytes); "
                f"e.g. {safe_stem(name)!r}")
    return None


def validate(config: Config) -> None:
    """Ranges of every number, then the checks across keys that ranges cannot express."""
    from lorasmith.common.sidecar import caption_extension
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
        (not n.train_t5xxl or config.optimizer.text_encoder_lr > 0,
         "network.train_t5xxl trains T5-XXL at optimizer.text_encoder_lr, which is 0: set it (e.g. 1e-5) or "
         "remove the key"),
        (n.network_dim % n.unit == 0 and n.conv_dim % n.unit == 0,
         f"network.network_dim = {n.network_dim}{f' and conv_dim = {n.conv_dim}' if n.conv_dim else ''} must be "
         f"multiples of network.unit = {n.unit}"),
        (not (config.model.v_parameterization and config.model.prediction_type == "epsilon"),
         'model.v_parameterization = true contradicts model.prediction_type = "epsilon": keep one'),
        (bool(o.output_dir.strip()), "output.output_dir is empty: give the folder the LoRA goes to"),
        (not (t.zero_terminal_snr is True and config.model.prediction_type == "epsilon"
              and not config.model.v_parameterization),
         'training.zero_terminal_snr = true needs v-prediction: at its last step there is no picture left, so '
         'ε-prediction has nothing to learn; set model.prediction_type = "v_prediction"'),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    from lorasmith.train.blocks import read_block_settings

    read_block_settings(n)  # block-wise lr/rank lists: their length for the family is checked once it is known
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
        from lorasmith.common.sidecar import SidecarError, decode_text

        try:
            decode_text(Path(prompts).read_bytes())
        except (SidecarError, OSError) as exc:
            raise ConfigError(f"{path}: sample.sample_prompts = {prompts} {exc}") from None


def to_toml(config: Config) -> str:
    import toml

    return toml.dumps(dataclasses.asdict(config))
