"""The lora stage on Flux.1: a trained file bound to a tiny Flux (each fused BFL module split back into its
diffusers layers), generate at weights, merge, info, resize, and ai-toolkit's diffusers-named files."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import small_dataset, write_preset
from hostile import lora_main

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def trained(tiny_flux, tmp_path_factory):
    """(the run's Result, its LoRA file) of a tiny Flux trained four steps with CLIP-L and T5-XXL."""
    from lorasmith.train.config import load_config
    from lorasmith.train.trainer import run

    root = tmp_path_factory.mktemp("flux-use")
    data = small_dataset(root / "data", images=3, repeats=4, size=(64, 64))
    path = write_preset(root / "p.toml", tiny_flux, data, root / "out",
                        dataset={"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128,
                                 "t5xxl_max_token_length": 32},
                        optimizer={"learning_rate": 1e-2, "text_encoder_lr": 1e-2}, network={"train_t5xxl": True})
    result, _ = run(load_config(path), progress=False, log=lambda message: None)
    return result, root / "out" / "test.safetensors"


def transformer_inputs(seed: int = 0) -> dict:
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), timestep=torch.tensor([0.4]),
                guidance=torch.tensor([3.5]), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 64, generator=g), txt_ids=torch.zeros(8, 3),
                img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32))


def test_generate_binds_the_file_as_trained_and_weight_zero_is_the_base(tiny_flux, trained):
    """lora generate's pipeline with the file at weight 1 gives the trained transformer's output and CLIP-L's
    pooled embedding within 1e-5; at weight 0 the base model's exactly."""
    from diffusers import FluxTransformer2DModel

    from lorasmith.lorafile.read import read_lora
    from lorasmith.use.apply import activate
    from lorasmith.use.render import Renderer

    result, file = trained
    renderer = Renderer(str(tiny_flux), {"clay": read_lora(file)})
    base = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    inputs = transformer_inputs()
    ids = renderer.pipe.tokenizer(["claymation style"], padding="max_length", max_length=77,
                                  return_tensors="pt").input_ids
    with torch.no_grad():
        live = result.unet.eval()(**inputs).sample
        activate(renderer.pipe, {"clay": 1.0})
        torch.testing.assert_close(renderer.pipe.transformer(**inputs).sample, live, atol=1e-5, rtol=0)
        torch.testing.assert_close(renderer.pipe.text_encoder(ids).pooler_output,
                                   result.text_encoders[0].eval()(ids).pooler_output, atol=1e-5, rtol=0)
        activate(renderer.pipe, {"clay": 0.0})
        torch.testing.assert_close(renderer.pipe.transformer(**inputs).sample, base(**inputs).sample, atol=1e-6,
                                   rtol=0)
        assert (live - base(**inputs).sample).abs().max() > 1e-4


def test_generate_and_img2img_write_pictures(tiny_flux, trained, tmp_path, capsys):
    _, file = trained
    common = ["generate", "--model", tiny_flux, "--lora", f"{file}:0.8", "--prompt", "claymation style, a blob",
              "--w", "64", "--h", "64", "--steps", "2", "--cfg", "3.5", "--seed", "3", "--out", tmp_path / "out",
              "--quiet"]
    code, text = lora_main(capsys, *common)
    assert code == 0, text[-2000:]
    pictures = [p for p in (tmp_path / "out").glob("*.png") if not p.name.startswith("sheet-")]
    assert len(pictures) == 1
    from PIL import Image

    with Image.open(pictures[0]) as image:
        assert image.size == (64, 64) and "<lora:test:0.8>" in image.text["parameters"]
    code, text = lora_main(capsys, *common, "--init-image", pictures[0], "--strength", "0.5")
    assert code == 0, text[-2000:]
    assert len([p for p in (tmp_path / "out").glob("*.png") if not p.name.startswith("sheet-")]) == 2


def test_merge_bakes_the_file_into_a_flux_folder_and_a_bfl_transformer_file(tiny_flux, trained, tmp_path, capsys):
    """--format diffusers: the merged transformer equals the trained one (base + ΔW). The default checkpoint is
    the transformer alone in BFL's layout, for a file without text-encoder modules (one with them is refused in
    one sentence): read back, it is the same transformer."""
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    from lorasmith.models import flux_file

    result, file = trained
    code, text = lora_main(capsys, "merge", "--model", tiny_flux, "--lora", file, "--format", "diffusers",
                           "--save-precision", "fp32", "--out", tmp_path / "merged")
    assert code == 0, text
    merged = FluxTransformer2DModel.from_pretrained(tmp_path / "merged", subfolder="transformer")
    inputs = transformer_inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).sample, result.unet.eval()(**inputs).sample, atol=1e-5, rtol=0)

    code, text = lora_main(capsys, "merge", "--model", tiny_flux, "--lora", file, "--out", tmp_path / "m.safetensors")
    assert code == 2 and "add --format diffusers to keep them" in text and not (tmp_path / "m.safetensors").exists()
    unet_only = {k: v for k, v in load_file(str(file)).items() if k.startswith("lora_unet_")}
    save_file(unet_only, str(tmp_path / "unet-only.safetensors"))
    for fmt, out in (("diffusers", tmp_path / "unet-merged"), ("checkpoint", tmp_path / "flux1-clay.safetensors")):
        code, text = lora_main(capsys, "merge", "--model", tiny_flux, "--lora", tmp_path / "unet-only.safetensors",
                               "--format", fmt, "--save-precision", "fp32", "--out", out)
        assert code == 0, text
    with safe_open(str(tmp_path / "flux1-clay.safetensors"), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        assert handle.metadata()["modelspec.architecture"] == "flux-1-dev"
    assert "double_blocks.1.img_attn.qkv.weight" in tensors and "single_blocks.1.linear1.weight" in tensors
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    from_file = flux_file.load_transformer(tensors, shapes, "flux1-clay.safetensors")
    folder = FluxTransformer2DModel.from_pretrained(tmp_path / "unet-merged", subfolder="transformer")
    assert all(torch.equal(v, from_file.state_dict()[k]) for k, v in folder.state_dict().items())


def test_info_checks_flux_names_against_the_base_and_resize_keeps_the_family(tiny_flux, trained, tmp_path, capsys):
    _, file = trained
    code, out = lora_main(capsys, "info", file, "--model", tiny_flux)
    assert code == 0 and "base model family: Flux.1" in out and "health: ok" in out and "checked against" in out
    assert "text encoder 3 (T5-XXL)" in out and "networks.lora_flux" in out, out
    code, out = lora_main(capsys, "resize", file, "--rank", "2", "--out", tmp_path / "r2.safetensors")
    assert code == 0, out
    resized = load_file(str(tmp_path / "r2.safetensors"))
    assert resized["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 2
    code, out = lora_main(capsys, "info", tmp_path / "r2.safetensors", "--model", tiny_flux)
    assert code == 0 and "health: ok" in out and "networks.lora_flux" in out, out
    assert resized["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"].shape[0] == 2


def test_ai_toolkit_diffusers_named_flux_file_reads_as_the_kohya_one(trained, tmp_path):
    """The trained adapters written as ai-toolkit does (transformer.<diffusers path>.lora_A/B, scale folded into
    B, no alpha): every module's ΔW equals the Kohya file's, and a part the file lacks (one block's to_v)
    contributes zero rows."""
    from lorasmith.lorafile.read import read_lora
    from lorasmith.models.adapters import lora_layers

    result, file = trained
    tensors = {}
    for path, layer in lora_layers(result.unet).items():
        if path == "transformer_blocks.0.attn.to_v":
            continue
        tensors[f"transformer.{path}.lora_A.weight"] = layer.lora_A["default"].weight.detach().clone()
        tensors[f"transformer.{path}.lora_B.weight"] = (layer.lora_B["default"].weight * layer.scaling["default"]).detach().clone()
    save_file(tensors, str(tmp_path / "ai-toolkit.safetensors"))
    theirs, ours = read_lora(tmp_path / "ai-toolkit.safetensors"), read_lora(file)
    unet = {k: m for k, m in ours.modules.items() if k.startswith("lora_unet_")}
    assert theirs.format == "diffusers" and set(theirs.modules) == set(unet)
    for key, module in unet.items():
        expected = module.delta()
        if key == "lora_unet_double_blocks_0_img_attn_qkv":
            expected[64:] = 0  # q and k rows stay, v's are gone
        torch.testing.assert_close(theirs.modules[key].delta(), expected, atol=1e-6, rtol=0)
