"""Kohya's block-wise settings: which block a module is in, the learning-rate curves, the preset's checks, and
short tiny runs (SD1.x and SDXL) whose files hold each block's own rank and alpha, with no module in a block at
learning-rate weight 0 and one optimizer group per weight.

Block numbers are Kohya's (sd-scripts networks/lora.py `get_block_index`), hand-checked against the original
layout: SD1.x input_blocks.N = N, middle_block = 12, output_blocks.N = 13 + N; SDXL 0 = embeddings,
input_blocks.N = 1 + N, middle_block.N = 10 + N, output_blocks.N = 13 + N, 22 = out.
"""

import json
import math
import re

import pytest
import torch

from conftest import small_dataset, write_preset
from lorasmith.train.blocks import block_index, block_lr_weights, lr_preset, plan_blocks, read_block_settings
from lorasmith.train.config import ConfigError, load_config
from lorasmith.train.schema import NetworkConfig


@pytest.mark.parametrize("family, path, expected", [
    # SD1.5: 4 down blocks of 2 layers, each but the last with a downsampler
    ("sd1", "conv_in", 0),
    ("sd1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 1),
    ("sd1", "down_blocks.0.resnets.1.conv1", 2),
    ("sd1", "down_blocks.0.downsamplers.0.conv", 3),
    ("sd1", "down_blocks.1.attentions.0.proj_in", 4),
    ("sd1", "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2", 8),
    ("sd1", "down_blocks.2.downsamplers.0.conv", 9),
    ("sd1", "down_blocks.3.resnets.0.time_emb_proj", 10),
    ("sd1", "down_blocks.3.resnets.1.conv2", 11),
    ("sd1", "mid_block.resnets.0.conv1", 12),
    ("sd1", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 12),
    ("sd1", "mid_block.resnets.1.conv2", 12),
    ("sd1", "up_blocks.0.resnets.0.conv1", 13),
    ("sd1", "up_blocks.0.upsamplers.0.conv", 15),  # shares output_blocks.2 with the last resnet
    ("sd1", "up_blocks.1.attentions.0.proj_out", 16),
    ("sd1", "up_blocks.1.upsamplers.0.conv", 18),
    ("sd1", "up_blocks.2.resnets.2.conv_shortcut", 21),
    ("sd1", "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0", 24),
    ("sd2", "up_blocks.3.attentions.2.proj_out", 24),
    ("sd1", "time_embedding.linear_1", None),
    # SDXL: 3 down blocks of 2 layers; the mid block counts three (resnet, transformer, resnet)
    ("sdxl", "time_embedding.linear_1", 0),
    ("sdxl", "add_embedding.linear_2", 0),
    ("sdxl", "conv_in", 1),
    ("sdxl", "down_blocks.0.resnets.0.conv1", 2),
    ("sdxl", "down_blocks.0.downsamplers.0.conv", 4),
    ("sdxl", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v", 5),
    ("sdxl", "down_blocks.1.downsamplers.0.conv", 7),
    ("sdxl", "down_blocks.2.attentions.1.proj_in", 9),
    ("sdxl", "mid_block.resnets.0.conv1", 10),
    ("sdxl", "mid_block.attentions.0.transformer_blocks.9.ff.net.2", 11),
    ("sdxl", "mid_block.resnets.1.time_emb_proj", 12),
    ("sdxl", "up_blocks.0.attentions.0.proj_out", 13),
    ("sdxl", "up_blocks.0.upsamplers.0.conv", 15),
    ("sdxl", "up_blocks.1.resnets.1.conv_shortcut", 17),
    ("sdxl", "up_blocks.2.resnets.2.conv2", 21),
    ("sdxl", "conv_out", 22),
])
def test_block_index_of_sd1_and_sdxl_paths(family, path, expected):
    assert block_index(path, family) == expected


@pytest.mark.parametrize("family, path, expected", [
    ("sd1", "down_blocks.0.attentions.0.proj_in", 1), ("sd1", "down_blocks.0.downsamplers.0.conv", 2),
    ("sd1", "down_blocks.1.resnets.0.conv1", 3), ("sd1", "up_blocks.0.resnets.1.conv1", 14),
    ("sd1", "up_blocks.0.upsamplers.0.conv", 14), ("sd1", "up_blocks.1.attentions.1.proj_out", 16),
    ("sdxl", "down_blocks.1.attentions.0.proj_in", 4), ("sdxl", "up_blocks.1.resnets.0.conv1", 15),
])
def test_block_index_of_a_one_layer_per_block_unet(family, path, expected):
    """The tiny test bases: one layer per down block, so input_blocks.N counts more tightly."""
    assert block_index(path, family, layers_per_block=1) == expected


def test_a_unet_deeper_than_the_family_is_refused():
    with pytest.raises(ValueError, match="input_blocks.12, beyond the 12 down blocks SD1.x/SD2.x counts"):
        block_index("down_blocks.3.downsamplers.0.conv", "sd1")  # SD1.5 has none there
    with pytest.raises(ValueError, match="middle_block.3"):
        block_index("mid_block.attentions.1.proj_in", "sdxl")


@pytest.mark.parametrize("size, family", [("tiny", "sd1"), ("tiny-xl", "sdxl"), ("sd15", "sd1"), ("sdxl", "sdxl")])
def test_block_index_agrees_with_the_original_layout_names(size, family):
    """Every module Kohya adapts (with convolutions), placed through models/ldm_names.py's original names,
    which carry input_blocks.N / middle_block.N / output_blocks.N themselves (full-size UNets on the meta
    device: no weights)."""
    from diffusers import UNet2DConditionModel

    from lorasmith.models.ldm_names import original_key, unet_modules
    from lorasmith.models.tiny import SIZES
    from lorasmith.train.network import unet_targets

    with torch.device("meta"):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **SIZES[size]["unet"])
    table, lead = unet_modules(unet), int(family == "sdxl")
    paths = [name for name, _ in unet.named_modules() if re.fullmatch(unet_targets("kohya", True), name)]
    for path in paths:
        kind, n = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)",
                           original_key(path + ".weight", table, "unet")).groups()
        mid = 10 + int(n) if family == "sdxl" else 12
        expected = {"input_blocks": lead + int(n), "middle_block": mid, "output_blocks": 13 + int(n)}[kind]
        assert block_index(path, family, unet.config.layers_per_block) == expected, path
    assert len(paths) == {"tiny": 79, "tiny-xl": 119, "sd15": 278, "sdxl": 788}[size]


S = [math.sin(math.pi * i / 16) for i in range(9)]  # a quarter sine over 9 blocks: 0, sin(π/16), … 1


@pytest.mark.parametrize("spec, count, expected", [
    ("sine", 9, [0, 0.19509032201612825, 0.3826834323650898, 0.5555702330196022, 0.7071067811865476,
                 0.8314696123025452, 0.9238795325112867, 0.9807852804032304, 1]),
    ("cosine+.25", 9, [1.25, 1.2307852804032304, 1.1738795325112867, 1.0814696123025452, 0.9571067811865476,
                       0.8055702330196022, 0.6326834323650898, 0.44509032201612825, 0.25]),
    ("sine", 12, [0, 0.14231483827328514, 0.28173255684142967, 0.4154150130018864, 0.5406408174555976,
                  0.654860733945285, 0.7557495743542583, 0.8412535328311811, 0.9096319953545183,
                  0.9594929736144974, 0.9898214418809327, 1]),
    ("linear", 12, [i / 11 for i in range(12)]),
    ("linear+0.5", 9, [0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25, 1.375, 1.5]),
    ("reverse_linear", 9, [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]),
    ("reverse_linear+-0.5", 9, [0.5, 0.375, 0.25, 0.125, 0.0, -0.125, -0.25, -0.375, -0.5]),
    ("zeros", 12, [0.0] * 12),
    ("zeros+0.3", 9, [0.3] * 9),
])
def test_lr_weight_presets_match_hand_computed_values(spec, count, expected):
    assert lr_preset(spec, count) == pytest.approx(expected, abs=1e-15)


def test_block_lr_weights_fill_unset_parts_with_1_and_zero_what_lies_at_or_below_the_threshold():
    weights = block_lr_weights("linear", None, None, 0.2, "sd1")
    assert len(weights) == 25 and weights[12:] == [1.0] * 13
    assert weights[:4] == [0.0, 0.0, 0.0, pytest.approx(3 / 11)]  # 1/11 and 2/11 lie below 0.2
    xl = block_lr_weights(None, [1.0, 0.0, 2.0], "reverse_linear+-0.5", 0.0, "sdxl")
    assert len(xl) == 23 and xl[0] == xl[22] == 1.0 and xl[1:10] == [1.0] * 9 and xl[10:13] == [1.0, 0.0, 2.0]
    assert xl[13:22] == [0.5, 0.375, 0.25, 0.125, 0.0, 0.0, 0.0, 0.0, 0.0]  # negatives become 0, as in Kohya
    assert block_lr_weights(None, [], "", 0.0, "sd1") is None


def preset(tmp_path, network: str):
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "p.toml"
    path.write_text(f'config_version = 1\n[dataset]\ntrain_data_dir = "data"\n[network]\n{network}\n', encoding="utf-8")
    return path


TWELVE = ", ".join(["1.0"] * 12)


@pytest.mark.parametrize("network, message", [
    ('down_lr_weight = "square"', "network.down_lr_weight = 'square' is neither a list of numbers nor a preset "
                                  "(sine, cosine, linear, reverse_linear, zeros, optionally with +offset"),
    ('up_lr_weight = "cosine+x"', "network.up_lr_weight = 'cosine+x': the offset after '+' must be a number"),
    ("block_dims = [4, 4, 4]", "network.block_dims has 3 value(s); it takes one per UNet block: 25 on SD1.x/SD2.x, "
                               "23 on SDXL"),
    ("mid_lr_weight = [1.0, 1.0]", "network.mid_lr_weight has 2 value(s); it takes one per mid block: 1 on "
                                   "SD1.x/SD2.x, 3 on SDXL"),
    ('down_lr_weight = "1,1,1"', "network.down_lr_weight has 3 value(s); it takes one per down block "
                                 "(input_blocks.N): 12 on SD1.x/SD2.x, 9 on SDXL"),
    (f"down_lr_weight = [-1.0, {', '.join(['1.0'] * 11)}]", "network.down_lr_weight holds -1: a learning-rate "
                                                             "weight is ≥ 0"),
    (f"block_dims = [{', '.join(['4.5'] * 25)}]", "network.block_dims holds 4.5: ranks are whole numbers"),
    (f"block_dims = [{', '.join(['5000'] * 25)}]", "network.block_dims holds 5000: a rank is in [0, 4096]"),
    (f"block_alphas = [{', '.join(['0.0'] * 23)}]", "network.block_alphas holds 0: an alpha is > 0"),
    ('block_dims = ["a"]', "network.block_dims = ['a'] must be a list of numbers"),
    ("mid_lr_weight = [nan]", "network.mid_lr_weight holds nan: every value must be a finite number"),
    ('down_lr_weight = "1,,1"', "network.down_lr_weight = '1,,1' has an empty value between commas"),
    ("block_lr_zero_threshold = 0.1", "network.block_lr_zero_threshold applies to down_lr_weight, mid_lr_weight "
                                      "and up_lr_weight; none is set"),
    ("block_lr_zero_threshold = -0.1", "network.block_lr_zero_threshold = -0.1 is out of range"),
    ('network_module = "loha"\nmid_lr_weight = 0.5', "network.mid_lr_weight applies to lora and locon (Kohya's "
                                                    "networks/lora.py), not loha"),
    (f"down_lr_weight = [{TWELVE}]\nmid_lr_weight = [1.0, 1.0, 1.0]",
     "network.down_lr_weight has SD1.x/SD2.x's count of values but network.mid_lr_weight SDXL's"),
    (f"conv_block_alphas = [{', '.join(['1.0'] * 25)}]", "network.conv_block_alphas needs convolution adapters"),
])
def test_block_keys_are_checked_where_the_preset_is_read(tmp_path, network, message):
    with pytest.raises(ConfigError) as caught:
        load_config(preset(tmp_path, network))
    assert message in str(caught.value) and str(caught.value).startswith(str(tmp_path))


def test_kohya_comma_strings_and_set_overrides_read_as_lists(tmp_path):
    from lorasmith.train.config import to_toml

    path = preset(tmp_path, 'down_lr_weight = "0,0,0,0,0,0,1,1,1,1,1,1"\nup_lr_weight = "cosine+.5"\nmid_lr_weight = 2')
    c = load_config(path, ["network.block_dims=" + ",".join(["8"] * 25), "network.block_lr_zero_threshold=0.1"])
    n = c.network
    assert n.down_lr_weight == [0.0] * 6 + [1.0] * 6 and n.mid_lr_weight == [2.0] and n.up_lr_weight == "cosine+.5"
    assert n.block_dims == [8] * 25 and n.block_lr_zero_threshold == 0.1
    again = tmp_path / "again.toml"
    again.write_text(to_toml(c), encoding="utf-8")  # the resolved preset reads back the same
    assert load_config(again).network == n
    assert load_config(preset(tmp_path, "")).network.block_dims == []


@pytest.mark.parametrize("family, key, values, message", [
    ("sdxl", "block_dims", [4] * 25, "network.block_dims has 25 value(s), but an SDXL base takes 23 (one per UNet "
                                     "block)"),
    ("sd1", "conv_block_dims", [2] * 23, "network.conv_block_dims has 23 value(s), but an SD1.x/SD2.x base "
                                         "takes 25 (one per UNet block)"),
    ("sdxl", "down_lr_weight", [1.0] * 12, "network.down_lr_weight has 12 value(s), but an SDXL base takes 9 (one "
                                           "per down block (input_blocks.N))"),
    ("sd2", "mid_lr_weight", [1.0] * 3, "network.mid_lr_weight has 3 value(s), but an SD1.x/SD2.x base takes 1"),
])
def test_list_lengths_are_checked_against_the_base_family(family, key, values, message):
    n = NetworkConfig(**{key: values})
    read_block_settings(n)
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_blocks(n, family)


def test_a_plan_zeroes_the_ranks_of_blocks_without_learning_rate():
    n = NetworkConfig(network_dim=8, network_alpha=4, network_module="locon", up_lr_weight="zeros",
                      block_dims=list(range(25)))
    read_block_settings(n)
    plan = plan_blocks(n, "sd1")
    assert plan.dims == list(range(13)) + [0] * 12 and plan.conv_dims == [8] * 13 + [0] * 12
    assert plan.alphas == [4.0] * 25 and plan.conv_alphas == [4.0] * 25 and plan.lr == [1.0] * 13 + [0.0] * 12
    assert plan_blocks(NetworkConfig(), "sd1") is None


# -- tiny runs ------------------------------------------------------------------------------------------------
def captured_run(monkeypatch, path):
    """run() on the preset; also the optimizer's groups as set up: (lr, parameter count)."""
    from lorasmith.train.trainer import Trainer, run

    seen = {}
    setup = Trainer.setup_network

    def spy(self):
        setup(self)
        seen["groups"] = [(g["initial_lr"], len(g["params"])) for g in self.optimizer.param_groups]

    monkeypatch.setattr(Trainer, "setup_network", spy)
    result, _ = run(load_config(path), progress=False, log=lambda message: None)
    return result, seen["groups"]


def ranks_in_file(path):
    from lorasmith.lorafile.read import read_lora

    lora = read_lora(path)
    return lora, {key: (m.rank, m.alpha) for key, m in lora.modules.items()}


TINY_SD_LAYERS = {  # the tiny base's layers (one per down block) and their blocks, by hand
    "down_blocks_0_resnets_0": 1, "down_blocks_0_attentions_0": 1, "down_blocks_0_downsamplers_0": 2,
    "down_blocks_1_resnets_0": 3, "mid_block": 12, "up_blocks_0_resnets_0": 13, "up_blocks_0_resnets_1": 14,
    "up_blocks_0_upsamplers_0": 14, "up_blocks_1_resnets_0": 15, "up_blocks_1_attentions_0": 15,
    "up_blocks_1_resnets_1": 16, "up_blocks_1_attentions_1": 16,
}


def test_tiny_sd_run_keeps_block_ranks_drops_zero_blocks_and_groups_learning_rates(tmp_path, tiny_sd, monkeypatch,
                                                                                   capsys):
    down = [1.0, 0.0, 0.5] + [1.0] * 9  # input_blocks.1 (down_blocks.0's layer) at 0: no adapter there
    dims = [4] * 25
    dims[3], dims[12], dims[15], dims[16] = 2, 3, 5, 6
    alphas = [2.0] * 25
    alphas[12], alphas[16] = 1.5, 3.0
    conv = [2] * 25
    conv[3] = 6
    network = {"network_dim": 4, "network_alpha": 2, "conv_dim": 2, "conv_alpha": 1, "down_lr_weight": down,
               "mid_lr_weight": [2.0], "up_lr_weight": "linear", "block_lr_zero_threshold": 0.1,
               "block_dims": dims, "block_alphas": alphas, "conv_block_dims": conv}
    path = write_preset(tmp_path / "p.toml", tiny_sd, small_dataset(tmp_path / "data", images=2, repeats=1,
                                                                    size=(64, 64)),
                        tmp_path / "out", network=network, training={"max_train_steps": 2},
                        dataset={"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128},
                        optimizer={"learning_rate": 1e-3, "text_encoder_lr": 5e-4},
                        output={"save_state_every_n_steps": 1})
    result, groups = captured_run(monkeypatch, path)
    lora, ranks = ranks_in_file(result.outputs[-1])
    unet = {key: value for key, value in ranks.items() if key.startswith("lora_unet_")}
    # linear weights: up blocks 13 and 14 get 0/11 and 1/11, at or below the 0.1 threshold
    lr = [1.0, 0.0, 0.5] + [1.0] * 9 + [2.0] + [0.0, 0.0, 2 / 11, 3 / 11] + [1.0] * 8
    for key, (rank, alpha) in unet.items():
        layer = next(layer for layer in TINY_SD_LAYERS if key.startswith(f"lora_unet_{layer}_"))
        block = TINY_SD_LAYERS[layer]
        assert lr[block] > 0, key
        conv3x3 = re.search(r"(resnets_\d+_conv[12]|samplers_0_conv)$", key) is not None
        assert (rank, alpha) == ((conv[block], 1.0) if conv3x3 else (dims[block], alphas[block])), key
    blocks = {TINY_SD_LAYERS[next(l for l in TINY_SD_LAYERS if k.startswith(f"lora_unet_{l}_"))] for k in unet}
    assert blocks == {2, 3, 12, 15, 16}  # 1, 13 and 14 have no module at all
    assert {rank for rank, _ in unet.values()} == {2, 3, 5, 6}
    assert any(key.startswith("lora_te_") for key in ranks)  # the text encoder trains as before
    # one group per weight, weight 1 first, then as the UNet's modules reach them; the text encoder's last
    counts = {w: sum(1 for k in unet if lr[TINY_SD_LAYERS[next(l for l in TINY_SD_LAYERS
                                                              if k.startswith(f"lora_unet_{l}_"))]] == w) * 2
              for w in (1.0, 0.5, 2 / 11, 3 / 11, 2.0)}
    assert groups[:5] == [(pytest.approx(1e-3 * w), counts[w]) for w in (1.0, 0.5, 2 / 11, 3 / 11, 2.0)]
    assert len(groups) == 6 and groups[5][0] == 5e-4
    assert "block-wise: 5 UNet learning rate(s); no adapter in block(s) 1, 13, 14" in capsys.readouterr().out
    args = json.loads(lora.metadata["ss_network_args"])
    assert args == {"conv_dim": "2", "conv_alpha": "1.0", "down_lr_weight": "1,0,0.5,1,1,1,1,1,1,1,1,1",
                    "mid_lr_weight": "2", "up_lr_weight": "linear", "block_lr_zero_threshold": "0.1",
                    "block_dims": ",".join(map(str, dims)), "block_alphas": ",".join(f"{a:g}" for a in alphas),
                    "conv_block_dims": ",".join(map(str, conv))}
    resumed = resume_from_step_1(monkeypatch, path, tmp_path)  # the groups' layout fits the saved optimizer
    whole = lora_tensors(result)
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def lora_tensors(result):
    from safetensors.torch import load_file

    return load_file(str(result.outputs[-1]))


def resume_from_step_1(monkeypatch, path, tmp_path):
    """The run again from its step-1 state, into another folder: the final file's tensors."""
    from lorasmith.train.state import check_resume, load_resume
    from lorasmith.train.trainer import plan_run, run

    config = load_config(path)
    state = next((tmp_path / "out" / "test.state").glob("step-00000001-*"))
    config.output.output_dir = str(tmp_path / "resumed")
    loaded = load_resume(config, str(state))
    check_resume(config, *plan_run(config), loaded, force=False)
    return lora_tensors(run(config, progress=False, log=lambda message: None, resume=loaded)[0])


def xl_block(key: str) -> int:
    """Kohya's SDXL block of a file key, from the original name it carries."""
    kind, n = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", key).groups()
    return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[kind] + int(n)


def test_tiny_sdxl_run_keeps_block_ranks_and_drops_the_zero_weight_mid_transformer(tmp_path, tiny_xl, monkeypatch):
    dims = [4] * 23
    dims[4], dims[10], dims[13], dims[14] = 2, 3, 5, 6  # input_blocks.3, middle_block.0, output_blocks.0 and .1
    alphas = [float(d) for d in dims]
    network = {"network_dim": 4, "network_alpha": 4, "mid_lr_weight": [1.0, 0.0, 1.0], "up_lr_weight": "cosine",
               "block_dims": dims, "block_alphas": alphas}
    path = write_preset(tmp_path / "p.toml", tiny_xl, small_dataset(tmp_path / "data", images=2, repeats=1,
                                                                    size=(64, 64)),
                        tmp_path / "out", network=network, training={"max_train_steps": 2},
                        dataset={"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128})
    result, groups = captured_run(monkeypatch, path)
    lora, ranks = ranks_in_file(result.outputs[-1])
    assert not any(k.startswith("lora_unet_middle_block_1_") for k in ranks)  # weight 0: no module
    assert not any(k.startswith(("lora_unet_middle_block_0_", "lora_unet_middle_block_2_")) for k in ranks)  # resnets
    for key, (rank, alpha) in ranks.items():
        assert (rank, alpha) == (dims[xl_block(key)], alphas[xl_block(key)]), key
    assert {xl_block(k) for k in ranks} == {4, 13, 14}  # the tiny XL's transformers, less middle_block.1
    cosine = lr_preset("cosine", 9)
    assert [lr for lr, _ in groups] == pytest.approx([1e-3, 1e-3 * cosine[1]])  # output_blocks.0 at 1, .1 below
    assert json.loads(lora.metadata["ss_network_args"]) == {
        "mid_lr_weight": "1,0,1", "up_lr_weight": "cosine", "block_dims": ",".join(map(str, dims)),
        "block_alphas": ",".join(f"{a:g}" for a in alphas)}
