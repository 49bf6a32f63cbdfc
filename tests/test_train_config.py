"""The preset schema: strict errors that name the key, typed overrides, every shipped preset loads."""

import subprocess
import sys
from pathlib import Path

import pytest
import toml

from conftest import REPO
from lorasmith.train.config import Config, ConfigError, load_config, to_toml

PRESETS = sorted((REPO / "presets").glob("*.toml"))


def preset(tmp_path, text: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "p.toml"
    path.write_text('config_version = 1\n[dataset]\ntrain_data_dir = "data"\n' + text, encoding="utf-8")
    return path


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_shipped_preset_loads(tmp_path, path):
    config = load_config(path, [f"dataset.train_data_dir={tmp_path}"])
    assert config.config_version == 1 and config.dataset.train_data_dir == str(tmp_path)
    text = path.read_text(encoding="utf-8")
    keys = [line.split("=")[0].strip() for line in text.splitlines() if "=" in line and not line.startswith("#")]
    lines = text.splitlines()
    for key in keys:  # every key carries advice: a comment on the line above or at the end of its own line
        index = next(i for i, line in enumerate(lines) if line.split("=")[0].strip() == key)
        assert "#" in lines[index] or lines[index - 1].startswith("#") or key == "config_version", (path.name, key)


def test_sd15_presets_follow_the_usual_advice(tmp_path):
    for path in [p for p in PRESETS if p.name.startswith("sd15")]:
        c = load_config(path, [f"dataset.train_data_dir={tmp_path}"])
        assert c.optimizer.optimizer_type == "AdamW8bit" and c.optimizer.learning_rate == 1e-4
        assert c.optimizer.text_encoder_lr == c.optimizer.learning_rate / 2
        assert c.schedule.lr_scheduler == "cosine" and c.schedule.lr_warmup_steps == 0.1
        assert c.network.network_alpha < c.network.network_dim and c.dataset.resolution == 512


@pytest.mark.parametrize(
    "text, message",
    [
        ("[network]\nnetwork_dimm = 8\n", "unknown key network.network_dimm; did you mean 'network_dim'? valid keys: network_module, network_dim"),
        ("[training]\nclip_skip = 'two'\n", "training.clip_skip = 'two' must be int, not str"),
        ("[optimizer]\noptimizer_type = 'SGD'\n", "optimizer.optimizer_type = 'SGD' is not one of 'AdamW8bit'"),
        ("resolution = 500\n", "dataset.resolution must be a multiple of 64"),
        ("[trainer]\nx = 1\n", "unknown key trainer; did you mean 'training'?"),
        ("[training]\nclip_skip = 0\n", "training.clip_skip = 0 is out of range: it must be [1, 48] (Kohya's"),
        ("[optimizer]\nunet_lr = -1\n", "optimizer.unet_lr = -1.0 is out of range: it must be ≥ 0"),
        ("[network]\nnetwork_dropout = 1\n", "network.network_dropout = 1.0 is out of range: it must be [0, 1)"),
        ("[training]\nmax_train_steps = 1e4\nmax_train_epochs = 2.5\n", "max_train_epochs = 2.5 must be int"),
        ("[optimizer]\nlearning_rate = nan\n", "optimizer.learning_rate = nan must be a finite number"),
        ("[dataset\n", "not valid TOML"),
        ("[model]\nv_parameterization = true\nprediction_type = 'epsilon'\n",
         'model.v_parameterization = true contradicts model.prediction_type = "epsilon": keep one'),
        ("[model]\nprediction_type = 'v'\n", "model.prediction_type = 'v' is not one of 'auto'"),
        ("[network]\nnetwork_module = 'loha'\nnetwork_dropout = 0.1\n",
         "network.network_dropout applies to lora, locon and dylora; loha uses network.rank_dropout and "
         "network.module_dropout"),
        ("[network]\nrank_dropout = 0.1\n", "network.rank_dropout and module_dropout apply to loha and lokr"),
        ("[network]\nnetwork_module = 'loha'\nfactor = 4\n", "network.factor applies to lokr only"),
        ("[network]\nunit = 4\n", "network.unit applies to dylora only"),
        ("[network]\nnetwork_module = 'dylora'\nnetwork_dim = 30\nconv_dim = 8\nunit = 4\n",
         "network.network_dim = 30 and conv_dim = 8 must be multiples of network.unit = 4"),
        ("[network]\nnetwork_module = 'dora'\n", "network.network_module = 'dora' is not one of 'lora', 'locon'"),
    ],
)
def test_strict_errors_name_the_file_and_key(tmp_path, text, message):
    path = preset(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_a_missing_dataset_folder_is_named(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[dataset]\ntrain_data_dir = "nowhere"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"dataset.train_data_dir = {tmp_path / 'nowhere'} is not a folder"):
        load_config(path)


def test_overrides_are_typed_from_the_schema(tmp_path):
    path = preset(tmp_path, "")
    c = load_config(path, ["optimizer.learning_rate=2e-4", "training.clip_skip=2", "dataset.flip_aug=true",
                           "output.output_name=x y", "model.pretrained_model=owner/model"])
    assert (c.optimizer.learning_rate, c.training.clip_skip, c.dataset.flip_aug) == (2e-4, 2, True)
    assert c.output.output_name == "x y" and c.model.pretrained_model == "owner/model"
    for bad, message in [("training.clip_skip=two", "expected a whole number, got 'two'"), ("lr=1", "section.key=value"),
                         ("optim.lr=1", "unknown section 'optim'"), ("dataset.flip_aug=maybe", "true or false")]:
        with pytest.raises(ConfigError, match=message):
            load_config(path, [bad])


def test_relative_paths_follow_the_preset_and_the_resolved_config_round_trips(tmp_path):
    path = preset(tmp_path, '[output]\noutput_dir = "out"\n')
    config = load_config(path)
    assert config.dataset.train_data_dir == str(tmp_path / "data")
    assert config.output.output_dir == str(tmp_path / "out")
    again = tmp_path / "again.toml"
    again.write_text(to_toml(config), encoding="utf-8")
    assert load_config(again) == config
    assert set(toml.loads(to_toml(config))) == set(Config.__dataclass_fields__)


def test_cli_config_error_exits_2_with_one_line(tmp_path):
    path = preset(tmp_path, "[network]\nrank = 8\n")
    done = subprocess.run([str(Path(sys.executable).parent / "train-lora"), str(path), "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "unknown key network.rank" in done.stderr


def test_sdxl_presets_train_at_1024_with_kohyas_sdxl_advice(tmp_path):
    paths = [p for p in PRESETS if p.name.startswith("sdxl")]
    assert [p.name for p in paths] == ["sdxl-character.toml", "sdxl-style.toml"]
    for path in paths:
        c = load_config(path, [f"dataset.train_data_dir={tmp_path}"])
        assert (c.dataset.resolution, c.dataset.min_bucket_reso, c.dataset.max_bucket_reso) == (1024, 512, 2048)
        assert c.training.gradient_checkpointing and c.training.clip_skip == 1 and c.optimizer.text_encoder_lr == 0
        assert c.model.pretrained_model == "stabilityai/stable-diffusion-xl-base-1.0"


def test_flux_presets_train_by_flow_matching_with_kohyas_flux_advice(tmp_path):
    """Four Flux presets (style and character, 24 and 16 GiB); each passes the flow family's key checks."""
    from lorasmith.models.families import family_named
    from lorasmith.train.flow_checks import check_flow_preset

    paths = [p for p in PRESETS if p.name.startswith("flux")]
    assert [p.name for p in paths] == ["flux-dev-character-16gb.toml", "flux-dev-character.toml",
                                       "flux-dev-style-16gb.toml", "flux-dev-style.toml"]
    for path in paths:
        c = load_config(path, [f"dataset.train_data_dir={tmp_path}"])
        check_flow_preset(family_named("flux"), c)
        assert c.model.pretrained_model == "black-forest-labs/FLUX.1-dev" and c.model.base_precision == "fp8"
        assert (c.training.timestep_sampling, c.training.discrete_flow_shift, c.training.guidance_scale) == (
            "shift", 3.1582, 1.0)
        assert c.dataset.resolution == (512 if "16gb" in path.name else 1024)
        assert c.network.network_dim == (8 if "16gb" in path.name else 16) and c.training.gradient_checkpointing
        assert c.dataset.cache_text_encoder_outputs and c.optimizer.text_encoder_lr == 0
