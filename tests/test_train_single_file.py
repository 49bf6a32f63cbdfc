"""Base models as one checkpoint file in the original layout, as users download them: tiny SD1.x and SD2.x
(v-prediction) files written in the test, loaded back offline through train-lora's loader and used by
train-lora and `lora generate`."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import small_dataset, write_preset
from lorasmith.models.base import load_components

BIN = Path(sys.executable).parent
CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's ids for "a photo of a cat"


def tiny_parts(family: str, seed: int = 0):
    """A tiny SD of the family with CLIP's real tokenizer (the file carries none; lorasmith ships it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorasmith.models.tiny import SIZES, sd_scheduler
    from lorasmith.models.tokenizer import OPENCLIP_PAD, clip_tokenizer

    sd2 = family == "sd2"
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                        hidden_act="gelu" if sd2 else "quick_gelu", bos_token_id=0, eos_token_id=2,
                                        pad_token_id=1))
    spec = dict(SIZES["tiny"]["unet"])
    if sd2:  # SD2's conventions: linear projections, 64-wide heads (one head at these widths), upcast attention
        spec.update(use_linear_projection=True, attention_head_dim=(1, 1), upcast_attention=True)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **SIZES["tiny"]["vae"])
    scheduler = sd_scheduler()
    if sd2:
        scheduler = scheduler.from_config(scheduler.config, prediction_type="v_prediction")
    return clip_tokenizer(OPENCLIP_PAD if sd2 else "<|endoftext|>"), text, vae, unet, scheduler


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def base(request, tmp_path_factory):
    """(family, diffusers folder, single file) of one tiny model."""
    from lorasmith.models.tiny import save_pipeline
    from lorasmith.models.checkpoint import original_state_dict, save_checkpoint

    root = tmp_path_factory.mktemp(request.param)
    tokenizer, text, vae, unet, scheduler = tiny_parts(request.param)
    folder = save_pipeline(root / "folder", tokenizer, text, vae, unet, scheduler)
    file = save_checkpoint(root / "model.safetensors", original_state_dict(unet, vae, text), {})
    return request.param, folder, file


def outputs(parts):
    ids = torch.tensor([CAT + [49407] * 70])
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        emb = parts.text_encoder(ids)[0]
        return (emb, parts.unet(sample, 500, encoder_hidden_states=emb).sample,
                parts.vae.decode(sample).sample,
                parts.vae.encode(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))).latent_dist.mean)


def test_a_single_file_loads_offline_as_its_folder_does(base, monkeypatch):
    family, folder, file = base
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_file, from_folder = load_components(str(file)), load_components(str(folder))
    assert from_file.family.name == family and from_folder.family is None
    assert from_file.family.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    assert from_file.scheduler.config.prediction_type == from_folder.scheduler.config.prediction_type
    assert from_file.tokenizer("a photo of a cat").input_ids == CAT
    assert from_file.tokenizer.pad_token == from_folder.tokenizer.pad_token
    for x, y in zip(outputs(from_file), outputs(from_folder)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    assert next(from_file.unet.parameters()).dtype == torch.float32


def test_a_half_precision_file_loads_as_fp32(base, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, file = base
    save_file({k: v.half() for k, v in load_file(str(file)).items()}, str(tmp_path / "half.safetensors"))
    parts = load_components(str(tmp_path / "half.safetensors"), ("unet", "text_encoder"))
    assert {p.dtype for p in parts.unet.parameters()} == {torch.float32}
    assert parts.vae is None and parts.tokenizer is None  # parts not asked for are not built


def test_train_lora_trains_on_a_single_file_offline(base, tmp_path):
    family, _, file = base
    data = small_dataset(tmp_path / "data", images=2, size=(64, 64))
    preset = write_preset(tmp_path / "p.toml", file, data, tmp_path / "out",
                          dataset={"train_data_dir": str(data), "resolution": 64, "min_bucket_reso": 64,
                                   "max_bucket_reso": 64},
                          training={"max_train_steps": 2, "train_batch_size": 1})
    env = {"HF_HUB_OFFLINE": "1", "PATH": str(BIN)}
    run = subprocess.run([BIN / "train-lora", str(preset), "--quiet"], capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stderr
    label = "SD1.x checkpoint" if family == "sd1" else "SD2.x (v-prediction) checkpoint"
    assert run.stdout.splitlines()[0] == f"base model: model.safetensors, a single-file {label}"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "test.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_sd_model_name"] == "model.safetensors"
    expected = {"sd1": ("sd_v1", "False", "stable-diffusion-v1/lora", "epsilon"),
                "sd2": ("sd_v2", "True", "stable-diffusion-v2-768-v/lora", "v_prediction")}[family]
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["modelspec.architecture"],
            meta["modelspec.prediction_type"]) == expected


@pytest.mark.parametrize("make, words", [
    (lambda d: torch.save({"state_dict": {"x": torch.zeros(1)}, "cb": pickle.PickleError()}, d / "code.ckpt"),
     ["code.ckpt holds Python objects besides tensors", "never unpickles code"]),
    (lambda d: __import__("safetensors.torch").torch.save_file(
        {"lora_unet_a.lora_down.weight": torch.zeros(1, 1)}, str(d / "clay.safetensors")),
     ["clay.safetensors is a LoRA"]),
])
def test_a_file_that_is_no_base_model_is_one_line_and_exit_2(tmp_path, make, words):
    make(tmp_path)
    file = next(p for p in tmp_path.iterdir() if p.is_file())
    data = small_dataset(tmp_path / "data", images=1, size=(64, 64))
    preset = write_preset(tmp_path / "p.toml", file, data, tmp_path / "out")
    run = subprocess.run([BIN / "train-lora", str(preset), "--quiet"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    (line,) = [x for x in run.stderr.splitlines() if x.startswith("train-lora:")]
    assert all(w in line for w in words), line


def test_lora_generate_takes_a_single_file_model(base, tmp_path):
    import numpy as np
    from PIL import Image

    from lorasmith.use.cli import main

    family, folder, file = base
    pictures = []
    for model in (file, folder):
        out = tmp_path / model.name
        assert main(["generate", "--model", str(model), "--prompt", "a photo of a cat", "--w", "64", "--h", "64",
                     "--steps", "2", "--seed", "1", "--sampler", "ddim", "--out", str(out), "--quiet"]) == 0
        (picture,) = [p for p in out.glob("0*.png")]
        pictures.append(np.asarray(Image.open(picture)).astype(int))
    assert np.abs(pictures[0] - pictures[1]).max() <= 1


def test_a_tiny_sdxl_file_loads_back_with_both_text_encoders(tmp_path, tiny_xl):
    """SDXL's layout (label_emb, CLIP-L and OpenCLIP-bigG under conditioner.embedders.0/1) written by lorasmith's
    writer and loaded back: the UNet with its size/pooled-text conditioning and both encoders equal the models
    written, within 1e-5. `lora` (SD1.x and SD2.x so far) refuses it in one sentence."""
    from lorasmith.models.single_file import CheckpointError
    from lorasmith.models.checkpoint import original_state_dict, save_checkpoint

    built = load_components(str(tiny_xl), ("text_encoder", "text_encoder_2", "vae", "unet"), families=("sdxl",))
    unet, vae, clip_l, big_g = built.unet, built.vae, built.text_encoder, built.text_encoder_2
    file = save_checkpoint(tmp_path / "xl.safetensors", original_state_dict(unet, vae, clip_l, big_g), {})
    parts = load_components(str(file), ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "unet"),
                            families=("sdxl",))
    assert parts.family.name == "sdxl" and parts.tokenizer_2.pad_token == "!" and parts.tokenizer.pad_token != "!"
    ids = torch.tensor([CAT + [49407] * 70])
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for loaded, original in ((parts.text_encoder, clip_l), (parts.text_encoder_2, big_g)):
            for x, y in zip(loaded(ids, output_hidden_states=True).hidden_states, original(ids, output_hidden_states=True).hidden_states):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
        torch.testing.assert_close(parts.text_encoder_2(ids).text_embeds, big_g(ids).text_embeds, atol=1e-5, rtol=0)
        context = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(2))
        added = {"text_embeds": torch.randn(2, 32, generator=torch.Generator().manual_seed(3)),
                 "time_ids": torch.tensor([[1024.0, 768, 0, 32, 1024, 768]] * 2)}
        torch.testing.assert_close(parts.unet(sample, 300, context, added_cond_kwargs=added).sample,
                                   unet(sample, 300, context, added_cond_kwargs=added).sample, atol=1e-5, rtol=0)
        torch.testing.assert_close(parts.vae.decode(sample).sample, vae.decode(sample).sample, atol=1e-5, rtol=0)
    from_folder = load_components(str(tiny_xl), ("tokenizer_2", "text_encoder_2", "unet"), families=("sdxl",))
    assert from_folder.tokenizer_2("a photo of a cat").input_ids == CAT and from_folder.text_encoder is None
    with pytest.raises(CheckpointError, match=r"is an SDXL model \(it has text_encoder_2\)"):
        load_components(str(tiny_xl), ("unet",))
    with pytest.raises(CheckpointError, match=r"^xl.safetensors is an SDXL base checkpoint; lora runs SD1.x and SD2.x "):
        load_components(str(file), ("unet",))


def test_an_sd2_base_file_read_as_768_v_trains_as_epsilon_when_the_preset_says_so(base, tmp_path):
    """An SD2.x file without its training step reads as v-prediction; model.prediction_type = "epsilon" (an
    SD2.x-base file) sets the loss, the samplers and the metadata."""
    from lorasmith.train.config import ModelConfig, TrainingConfig
    from lorasmith.models.tiny import sd_scheduler
    from lorasmith.train.objective import noise_schedule as schedule

    def noise_schedule(scheduler, model):
        return schedule(scheduler, model, TrainingConfig())[0]

    family, _, file = base
    if family != "sd2":
        pytest.skip("the SD2.x case")
    v = sd_scheduler().from_config(sd_scheduler().config, prediction_type="v_prediction")
    assert noise_schedule(v, ModelConfig()) is v
    assert noise_schedule(v, ModelConfig(prediction_type="epsilon")).config.prediction_type == "epsilon"
    assert noise_schedule(sd_scheduler(), ModelConfig(v_parameterization=True)).config.prediction_type == "v_prediction"
    data = small_dataset(tmp_path / "data", images=2, size=(64, 64))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blob --w 64 --h 64 --s 2\n", encoding="utf-8")
    preset = write_preset(tmp_path / "p.toml", file, data, tmp_path / "out",
                          dataset={"train_data_dir": str(data), "resolution": 64, "min_bucket_reso": 64,
                                   "max_bucket_reso": 64},
                          training={"max_train_steps": 1, "train_batch_size": 1},
                          sample={"sample_prompts": str(prompts), "sample_at_first": True})
    preset.write_text(preset.read_text().replace("[model]\n", '[model]\nprediction_type = "epsilon"\n'))
    run = subprocess.run([BIN / "train-lora", str(preset), "--quiet"], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": str(BIN)})
    assert run.returncode == 0, run.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "test.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["modelspec.prediction_type"]) == (
        "sd_v2", "stable-diffusion-v2-512/lora", "epsilon")
    assert len(list((tmp_path / "out" / "test.samples").glob("*-grid.png"))) == 2
