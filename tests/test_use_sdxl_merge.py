"""`lora merge`, `resize` and `info` on SDXL and SD2.x bases: the merged single file and folder load back through
diffusers with exactly the merged weights and draw what the LoRA draws on the fly; a v-prediction base keeps its
markers; names are checked against the family's public architecture."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hostile import lora_main
from loras import random_modules, write_kohya
from lorasmith.models.base import load_components
from lorasmith.models.families import FAMILIES
from lorasmith.use.apply import layer_table
from lorasmith.use.cli import main

XL_META = {"ss_base_model_version": "sdxl_base_v1-0"}
XL_PARTS = ("text_encoder", "text_encoder_2", "unet")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def sgm_names(plain: dict, aliased: dict) -> dict[str, str]:
    """diffusers-named UNet key → its original (SGM) name, from the aliases the layer table adds."""
    alias = {(layer.component, layer.path): key for key, layer in aliased.items() if key not in plain}
    return {key: alias[layer.component, layer.path] for key, layer in plain.items()
            if (layer.component, layer.path) in alias}


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    """The tiny SDXL with its second encoder wider than its first (48 and 32, a context of 80), as in SDXL (768 and
    1280): diffusers' single-file loader tells the two towers apart by width alone, so the session's tiny_xl,
    both 32 wide, would come back with CLIP-L's weights in both."""
    from lorasmith.models.tiny import SIZES, build_sd

    spec = SIZES["tiny-xl"]
    wide = dict(spec, text_2=dict(spec["text_2"], hidden_size=48), unet=dict(spec["unet"], cross_attention_dim=80))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(SIZES, "tiny-xl-wide", wide)
        return build_sd(tmp_path_factory.mktemp("tiny-xl-wide"), "tiny-xl-wide")


@pytest.fixture(scope="module")
def xl_base(tiny_xl):
    return load_components(str(tiny_xl), XL_PARTS, families=FAMILIES)


@pytest.fixture(scope="module")
def xl_table(xl_base):
    return layer_table(xl_base.unet, xl_base.text_encoder, text_encoder_2=xl_base.text_encoder_2)


@pytest.fixture(scope="module")
def xl_lora(xl_base, xl_table, tmp_path_factory):
    """Attention of the UNet (the down block under diffusers' names, the rest under SGM's, as Kohya writes SDXL)
    and both text encoders, rank 4, alpha 2."""
    plain = layer_table(xl_base.unet, xl_base.text_encoder, aliases=False, text_encoder_2=xl_base.text_encoder_2)
    chosen = random_modules(plain, 5, 4, lambda k: ("attn" in k and "to_" in k) or k.startswith("lora_te"))
    sgm = sgm_names(plain, xl_table)
    path = write_kohya(tmp_path_factory.mktemp("xl-lora") / "xl.safetensors", chosen, 2.0, XL_META,
                       rename=lambda k: k if k.startswith("lora_unet_down_") else sgm.get(k, k))
    keys = load_file(str(path))
    assert any(k.startswith("lora_unet_down_blocks_") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    return path


def merged_by_hand(folder, lora_path, weight: float = 1.0) -> dict[str, dict[str, torch.Tensor]]:
    """The base's UNet and text encoders with up·down·alpha/rank added from the raw tensors of the file: the
    weights a correct merge must write."""
    parts = load_components(str(folder), XL_PARTS, families=FAMILIES)
    table = layer_table(parts.unet, parts.text_encoder, text_encoder_2=parts.text_encoder_2)
    tensors = load_file(str(lora_path))
    with torch.no_grad():
        for name in {k.split(".")[0] for k in tensors}:
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            layer = table[name]
            weight_of = getattr(parts, layer.component).get_submodule(layer.path).weight
            delta = (up.flatten(1) @ down.flatten(1)) * float(tensors[f"{name}.alpha"]) / down.shape[0]
            weight_of += weight * delta.reshape(weight_of.shape)
    return {part: getattr(parts, part).state_dict() for part in XL_PARTS}


def assert_same_weights(pipe, expected: dict) -> None:
    for part, state in expected.items():
        loaded = getattr(pipe, part).state_dict()
        for key, value in state.items():
            if key.endswith("position_ids"):
                continue
            torch.testing.assert_close(loaded[key].float(), value, atol=1e-6, rtol=0, msg=f"{part}.{key}")


@pytest.fixture(scope="module")
def xl_expected(tiny_xl, xl_lora):
    return merged_by_hand(tiny_xl, xl_lora)


@pytest.fixture(scope="module")
def xl_merged(tiny_xl, xl_lora, tmp_path_factory):
    """The LoRA at weight 1 merged into the tiny SDXL base in fp32, as one file and as a folder."""
    root = tmp_path_factory.mktemp("xl-merged")
    for out, fmt in ((root / "merged.safetensors", "checkpoint"), (root / "merged", "diffusers")):
        code = main(["merge", "--model", str(tiny_xl), "--lora", str(xl_lora), "--out", str(out), "--format", fmt,
                     "--save-precision", "fp32"])
        assert code == 0
    return root / "merged.safetensors", root / "merged"


def test_sdxl_merge_single_file_loads_in_diffusers_with_the_merged_weights(tiny_xl, xl_expected, xl_merged, offline):
    """(a) The single file in SDXL's original layout, through diffusers' own from_single_file (config from the
    tiny folder), holds base + ΔW in both UNets' and both encoders' weights; its metadata names SDXL base."""
    from diffusers import StableDiffusionXLPipeline

    single, _ = xl_merged
    with safe_open(str(single), "pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
    assert not keys & {"v_pred", "ztsnr", "global_step"}
    assert (meta["modelspec.architecture"], meta["modelspec.prediction_type"]) == (
        "stable-diffusion-xl-v1-base", "epsilon")
    assert [s["file"] for s in json.loads(meta["lorasmith_merged_loras"])] == ["xl.safetensors"]
    pipe = StableDiffusionXLPipeline.from_single_file(str(single), config=str(tiny_xl), local_files_only=True)
    assert_same_weights(pipe, xl_expected)
    base = load_components(str(tiny_xl), XL_PARTS, families=FAMILIES)
    for part in XL_PARTS:  # the LoRA changed every part
        before = getattr(base, part).state_dict()
        assert any(not torch.equal(before[k], v) for k, v in xl_expected[part].items()), part


def test_sdxl_merge_folder_loads_with_from_pretrained(xl_expected, xl_merged, offline):
    """(c) The diffusers folder is a StableDiffusionXLPipeline with the same merged weights."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_merged[1], local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert_same_weights(pipe, xl_expected)


def test_sdxl_merged_file_draws_what_the_lora_draws_on_the_fly(tiny_xl, xl_lora, xl_merged, offline):
    """(b) Two steps at 64×64 from the merged single file equal the base with the LoRA loaded as an adapter at
    weight 1: within 1e-4 on [0, 1] pixels as diffusers' SDXL pipeline draws both, within one 8-bit level as
    `lora generate`'s Renderer draws them (the file then read by lorasmith's own single-file reader)."""
    from diffusers import StableDiffusionXLPipeline

    from lorasmith.lorafile.read import read_lora
    from lorasmith.use.apply import activate, load_adapters

    live = StableDiffusionXLPipeline.from_pretrained(tiny_xl, local_files_only=True)
    load_adapters(live, {"xl": read_lora(xl_lora)})
    activate(live, {"xl": 1.0})
    baked = StableDiffusionXLPipeline.from_single_file(str(xl_merged[0]), config=str(tiny_xl), local_files_only=True)

    def draw(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("a fox", height=64, width=64, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(3)).images[0]

    on_the_fly, merged = draw(live), draw(baked)
    assert np.abs(on_the_fly - merged).max() <= 1e-4
    activate(live, {})
    assert np.abs(draw(live) - merged).max() > 1e-3  # the LoRA changes the picture
    del live, baked
    # lorasmith's own drawing, the merged file read by lorasmith's single-file reader: 8-bit pictures
    from lorasmith.common.prompts import Prompt
    from lorasmith.use.render import Renderer

    prompt = Prompt("a fox", width=64, height=64, steps=2)
    ours = Renderer(str(tiny_xl), {"xl": read_lora(xl_lora)}).draw(prompt, 3, {"xl": 1.0}, "ddim")
    from_file = Renderer(str(xl_merged[0]), {}).draw(prompt, 3, {}, "ddim")
    assert np.abs(np.asarray(ours).astype(int) - np.asarray(from_file).astype(int)).max() <= 1


@pytest.mark.parametrize("zero_snr", [True, False])
def test_a_v_prediction_sdxl_base_keeps_its_markers(tiny_xl, xl_lora, tmp_path, offline, zero_snr):
    """(d) ComfyUI's `v_pred` (and `ztsnr` for a zero-terminal-SNR schedule) as empty tensors, read back by
    lorasmith's own single-file reader as v-prediction."""
    folder = shutil.copytree(tiny_xl, tmp_path / "vpred")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(prediction_type="v_prediction", rescale_betas_zero_snr=zero_snr)
    config_path.write_text(json.dumps(config))
    out = tmp_path / "vpred.safetensors"
    assert main(["merge", "--model", str(folder), "--lora", str(xl_lora), "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as handle:
        markers = {k: handle.get_tensor(k) for k in ("v_pred", "ztsnr") if k in handle.keys()}
        meta = handle.metadata()
    assert list(markers) == (["v_pred", "ztsnr"] if zero_snr else ["v_pred"])
    assert all(t.numel() == 0 for t in markers.values())
    assert meta["modelspec.prediction_type"] == "v_prediction"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    back = load_components(str(out), ("scheduler",), families=FAMILIES)
    assert (back.family.name, back.family.prediction_type) == ("sdxl", "v_prediction")


FITS_XL = ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
           "lora_unet_output_blocks_0_1_transformer_blocks_9_attn1_to_q",
           "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
           "lora_te2_text_model_encoder_layers_31_self_attn_out_proj")
"""Names SDXL base has (Kohya's SGM names for the UNet, lora_te1/lora_te2 for the encoders)."""


def public_xl_lora(path, keys=FITS_XL, bogus: bool = False):
    """Modules shaped as SDXL base's layers (from its meta-device table), Kohya-named; with `bogus`, one name no
    SDXL layer has."""
    from lorasmith.use.info import reference_table

    modules = random_modules({k: reference_table("SDXL")[k] for k in keys}, 9, 4)
    if bogus:
        modules["lora_unet_input_blocks_4_1_transformer_blocks_0_attn9_to_k"] = (torch.ones(4, 2048) * 0.01,
                                                                                 torch.ones(640, 4) * 0.01)
    return write_kohya(path, modules, 2.0, XL_META)


def test_info_and_resize_check_an_sdxl_file_against_the_sdxl_architecture(tmp_path, capsys):
    """(e) No --model: SDXL's public architecture (built on the meta device, once) is the reference; a wrong name
    is a health problem for info and a refusal for resize, and a file that fits is resized. SD2.1's is there
    too."""
    import time

    from lorasmith.use.info import reference_table

    started = time.perf_counter()
    reference_table.cache_clear()
    table = reference_table("SDXL")
    assert time.perf_counter() - started < 20 and reference_table("SDXL") is table
    assert table["lora_te2_text_model_encoder_layers_31_mlp_fc1"].shape == (5120, 1280)
    assert table["lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k"].shape == (1280, 2048)
    sd21 = reference_table("SD2.x")
    assert sd21["lora_te_text_model_encoder_layers_22_mlp_fc1"].shape == (4096, 1024)
    assert sd21["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"].shape == (320, 1024)
    good, bad = public_xl_lora(tmp_path / "good.safetensors"), public_xl_lora(tmp_path / "bad.safetensors", bogus=True)
    code, out = lora_main(capsys, "info", good)
    assert code == 0 and "names: checked against the SDXL base architecture" in out and "health: ok" in out
    assert "input_blocks.4 " in out and "text encoder 2 " in out  # the rank table by SGM block
    code, out = lora_main(capsys, "info", bad)
    assert code == 1 and "checked against the SDXL base architecture" in out and "attn9_to_k" in out
    code, err = lora_main(capsys, "resize", bad, "--rank", "2")
    assert code == 2 and "bad.safetensors" in err and "attn9_to_k" in err and "not resized" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "bad-r2.safetensors").exists()
    small = public_xl_lora(tmp_path / "small.safetensors", FITS_XL[1:3])  # SVD at SDXL's widths costs seconds
    code, out = lora_main(capsys, "resize", small, "--rank", "2")
    assert code == 0 and (tmp_path / "small-r2.safetensors").exists()


def test_info_with_an_sdxl_model_checks_both_encoders(tiny_xl, xl_lora, tmp_path, capsys, offline):
    """`info --model` on an SDXL base builds its table with both text encoders; a file shaped for the tiny base
    is healthy there and, with a foreign name, flagged."""
    code, out = lora_main(capsys, "info", xl_lora, "--model", tiny_xl)
    assert code == 0 and f"names: checked against {tiny_xl}" in out and "health: ok" in out
    tensors = load_file(str(xl_lora))
    key = next(k for k in tensors if k.startswith("lora_te2_"))
    tensors[key.replace("lora_te2_", "lora_te3_", 1)] = tensors.pop(key)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "renamed.safetensors"), XL_META)
    code, out = lora_main(capsys, "info", tmp_path / "renamed.safetensors", "--model", tiny_xl)
    assert code == 1 and "lora_te3_" in out


def test_sd2_merge_to_a_single_file_round_trips(tmp_path, offline):
    """(f) SD2.x, v-prediction and epsilon: the single file holds OpenCLIP's layout, metadata naming the base
    (768-v or 512) and `v_pred` for v-prediction; the v-prediction file loads back (lorasmith's reader and
    diffusers' from_single_file) as v-prediction with the merged weights."""
    from diffusers import StableDiffusionPipeline

    from lorasmith.lorafile.read import read_lora
    from lorasmith.models.tiny import save_pipeline
    from lorasmith.use.apply import merge_into
    from lorasmith.use.merge import merge_checkpoint
    from test_train_single_file import tiny_parts

    tokenizer, text, vae, unet, scheduler = tiny_parts("sd2")
    table = layer_table(unet, text, aliases=False)
    lora = read_lora(write_kohya(tmp_path / "sd2.safetensors",
                                 random_modules(table, 4, 2, lambda k: "attn" in k or k.startswith("lora_te_")), 1.0,
                                 {"ss_base_model_version": "sd_v2"}))
    files = {}
    for prediction in ("v_prediction", "epsilon"):
        folder = save_pipeline(tmp_path / prediction, tokenizer, text, vae, unet,
                               scheduler.from_config(scheduler.config, prediction_type=prediction))
        out, changed = merge_checkpoint(str(folder), [(lora, 1.0)], tmp_path / f"{prediction}.safetensors",
                                        "checkpoint", torch.float32)
        assert changed == len(lora.modules)
        with safe_open(str(out), "pt") as handle:
            keys, meta = set(handle.keys()), handle.metadata()
        assert any(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in keys)
        assert ("v_pred" in keys) == (prediction == "v_prediction")
        assert (meta["modelspec.architecture"], meta["modelspec.prediction_type"]) == (
            "stable-diffusion-v2-768-v" if prediction == "v_prediction" else "stable-diffusion-v2-512", prediction)
        files[prediction] = folder, out
    folder, out = files["v_prediction"]
    mine = load_components(str(out))
    assert (mine.family.name, mine.family.prediction_type) == ("sd2", "v_prediction")
    theirs = StableDiffusionPipeline.from_single_file(str(out), config=str(folder), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    merge_into({"unet": unet, "text_encoder": text}, [(lora, 1.0)])
    for loaded in (mine, theirs):
        for part, model in (("unet", unet), ("text_encoder", text)):
            got = getattr(loaded, part).state_dict()
            for key, value in model.state_dict().items():
                if not key.endswith("position_ids"):
                    torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=f"{part}.{key}")
