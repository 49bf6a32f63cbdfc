"""`lora generate` on SDXL and SD2.x bases: both text encoders with A1111's emphasis each on its own, the first
chunk's pooled embedding, zeros for an empty negative, size conditioning, LoRAs on both encoders and the UNet,
img2img and sweeps, zero-terminal-SNR v-prediction sampling, a single-file SDXL base. Tiny random models, 64 px,
2 steps, everything in this process."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from loras import random_modules, write_kohya
from lorasmith.common.prompts import Prompt
from lorasmith.models.base import load_components
from lorasmith.use.cli import main

PROMPT = Prompt("a red fox in the snow", "", 64, 64, steps=2)
XL = {"ss_base_model_version": "sdxl_base_v1-0"}


def attention_and_both_encoders(key: str) -> bool:
    return ("attn" in key and "to_" in key) or key.startswith(("lora_te1_", "lora_te2_"))


@pytest.fixture(scope="module")
def xl_lora(tiny_xl, tmp_path_factory):
    """A random Kohya LoRA for the tiny SDXL: UNet attention and both text encoders (lora_te1_, lora_te2_)."""
    from lorasmith.use.apply import layer_table

    parts = load_components(str(tiny_xl), ("text_encoder", "text_encoder_2", "unet"), families=("sdxl",))
    table = layer_table(parts.unet, parts.text_encoder, aliases=False, text_encoder_2=parts.text_encoder_2)
    modules = random_modules(table, 5, 4, attention_and_both_encoders, 0.5)
    assert any(k.startswith("lora_te1_") for k in modules) and any(k.startswith("lora_te2_") for k in modules)
    return write_kohya(tmp_path_factory.mktemp("xl-lora") / "xl.safetensors", modules, 4.0, XL)


@pytest.fixture(scope="module")
def plain(tiny_xl):
    from lorasmith.use.render import Renderer

    return Renderer(str(tiny_xl), {}, "cpu")


@pytest.fixture(scope="module")
def with_lora(tiny_xl, xl_lora):
    from lorasmith.lorafile.read import read_lora
    from lorasmith.use.render import Renderer

    return Renderer(str(tiny_xl), {"xl": read_lora(xl_lora)}, "cpu")


def pixels(picture) -> np.ndarray:
    return np.asarray(picture).astype(int)


def test_weight_zero_is_the_base_and_the_lora_reaches_the_unet_and_both_encoders(plain, with_lora):
    base = pixels(plain.draw(PROMPT, 3, {}, "ddim"))
    assert np.array_equal(pixels(with_lora.draw(PROMPT, 3, {"xl": 0.0}, "ddim")), base)
    assert np.abs(pixels(with_lora.draw(PROMPT, 3, {"xl": 1.0}, "ddim")) - base).mean() > 1
    from lorasmith.use.apply import activate

    activate(with_lora.pipe, {"xl": 1.0})
    on = with_lora.embeddings(PROMPT)[0]
    activate(with_lora.pipe, {})
    off = with_lora.embeddings(PROMPT)[0]
    width = with_lora.encoders[0].config.hidden_size
    for part in (slice(None, width), slice(width, None)):  # CLIP-L's slice, then bigG's
        assert not torch.allclose(on["context"][..., part], off["context"][..., part])
    assert not torch.allclose(on["pooled"], off["pooled"])


def test_plain_prompts_embed_as_training_does(plain):
    """Without emphasis, one chunk: exactly SDXL.encode's conditioning, which train-lora learns against."""
    from lorasmith.models.family_sdxl import SDXL

    positive, _ = plain.embeddings(PROMPT)
    with torch.no_grad():
        trained = SDXL().encode(plain.tokenizers, plain.encoders, [PROMPT.prompt], 1)
    torch.testing.assert_close(positive["context"], trained["context"], atol=1e-6, rtol=0)
    torch.testing.assert_close(positive["pooled"], trained["pooled"], atol=1e-6, rtol=0)


def test_emphasis_weights_each_encoders_slice_and_restores_its_own_mean(plain):
    plain_states = plain.embeddings(Prompt("a fox"))[0]["context"]
    stressed = plain.embeddings(Prompt("a (fox:1.5)"))[0]["context"]  # "a " and "fox" are the same tokens
    width = plain.encoders[0].config.hidden_size
    for part in (slice(None, width), slice(width, None)):
        before, after = plain_states[0, :, part], stressed[0, :, part]
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after.mean(), before.mean(), atol=1e-6, rtol=1e-5)  # this slice's own mean
        restore = after[0] / before[0]  # the start token is unweighted: only the restoring factor moved it
        torch.testing.assert_close(after[2], before[2] * 1.5 * restore, atol=1e-5, rtol=1e-4)  # "fox"
        torch.testing.assert_close(after[1], before[1] * restore, atol=1e-5, rtol=1e-4)  # "a"


def test_a_long_prompt_pools_its_first_chunk_and_an_empty_negative_is_zeros(plain):
    long, first, second = (plain.embeddings(Prompt(" ".join(["cat"] * n)))[0] for n in (80, 75, 5))
    assert long["context"].shape == (1, 154, 64) and long["pooled"].shape == (1, 32)
    torch.testing.assert_close(long["pooled"], first["pooled"], atol=1e-6, rtol=0)
    assert not torch.allclose(long["pooled"], second["pooled"])
    positive, negative = plain.embeddings(Prompt(" ".join(["cat"] * 80), negative=""))
    assert negative["context"].shape == positive["context"].shape  # padded to the positive's two chunks
    assert not negative["context"].any() and not negative["pooled"].any()
    _, blurry = plain.embeddings(Prompt("a cat", negative="blurry"))
    assert blurry["context"].abs().sum() > 0 and blurry["pooled"].abs().sum() > 0


def test_img2img_ends_meet_and_the_vae_stays_fp32(tiny_xl, plain):
    """Strength 1 is the text-to-image picture of the seed, strength 0 the VAE's round trip; with the rest in
    bf16 the VAE still runs in fp32 and both paths draw."""
    from lorasmith.use.render import Renderer

    init = Image.new("RGB", (64, 64), (200, 40, 30))
    text = pixels(plain.draw(PROMPT, 4, {}, "euler_a"))
    assert np.array_equal(pixels(plain.draw(PROMPT, 4, {}, "euler_a", init, 1.0)), text)
    half = pixels(plain.draw(PROMPT, 4, {}, "euler_a", init, 0.5))
    assert half.shape == text.shape and np.abs(half - text).mean() > 1
    assert np.array_equal(pixels(plain.draw(PROMPT, 4, {}, "euler_a", init, 0.0)), pixels(plain.round_trip(init)))
    low = Renderer(str(tiny_xl), {}, "cpu", torch.bfloat16)
    assert low.pipe.vae.dtype == torch.float32 and low.pipe.unet.dtype == torch.bfloat16
    assert low.draw(PROMPT, 4, {}, "ddim", init, 0.5).size == (64, 64)  # encode fp32, denoise bf16, decode fp32


def test_a_nan_picture_is_refused_in_both_paths(plain):
    from lorasmith.models.sampling import NonFinitePicture

    def poison(module, inputs, output):
        (output[0] if isinstance(output, tuple) else output.sample).fill_(float("nan"))

    hook = plain.pipe.unet.register_forward_hook(poison)
    try:
        for init in (None, Image.new("RGB", (64, 64))):
            with pytest.raises(NonFinitePicture):
                plain.draw(PROMPT, 1, {}, "ddim", init, 0.5)
    finally:
        hook.remove()


def test_size_conditioning_reaches_the_unet(plain):
    """The default is the picture's own size, uncropped (A1111's); another original size or crop is another
    picture. (The command line's --original-size and --crop-top-left reach the renderer in the test below.)"""
    default = pixels(plain.draw(PROMPT, 5, {}, "ddim"))
    try:
        for size, crop, same in (((64, 64), (0, 0), True), ((1024, 768), None, False), (None, (32, 0), False)):
            plain.original_size, plain.crop = size, crop
            drawn = pixels(plain.draw(PROMPT, 5, {}, "ddim"))
            assert np.array_equal(drawn, default) if same else np.abs(drawn - default).mean() > 0.5
    finally:
        plain.original_size = plain.crop = None


def test_zero_terminal_snr_v_prediction_samples_from_pure_noise_with_rescaled_guidance(tiny_xl, tmp_path,
                                                                                      monkeypatch, capsys):
    from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline

    from lorasmith.models.sampling import guidance_rescale, make_scheduler
    from lorasmith.use.render import Renderer

    config = DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True).config
    ddim = make_scheduler("ddim", config)
    assert ddim.config.prediction_type == "v_prediction" and ddim.config.timestep_spacing == "trailing"
    assert ddim.alphas_cumprod[-1] == 0 and guidance_rescale(ddim) == 0.7
    ddim.set_timesteps(4)
    assert int(ddim.timesteps[0]) == 999
    assert make_scheduler("euler_a", config).alphas_cumprod[-1] <= 2**-24  # Euler's stand-in for zero
    plain = make_scheduler("euler_a", DDPMScheduler().config)
    usual = EulerAncestralDiscreteScheduler.from_config(DDPMScheduler().config)
    assert plain.config.timestep_spacing == usual.config.timestep_spacing and guidance_rescale(plain) == 0.0
    with pytest.raises(ValueError, match=r"sampler 'heun' cannot sample this zero-terminal-SNR base .*: choose one "
                                         r"of ddim, euler, euler_a"):
        make_scheduler("heun", config)

    folder = shutil.copytree(tiny_xl, tmp_path / "xl-v")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction",
                                       "rescale_betas_zero_snr": True}))
    seen = []
    call = StableDiffusionXLPipeline.__call__
    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__",
                        lambda pipe, **kwargs: seen.append((pipe.scheduler, kwargs)) or call(pipe, **kwargs))
    assert Renderer(str(folder), {}, "cpu").draw(PROMPT, 1, {}, "euler").size == (64, 64)
    ((scheduler, kwargs),) = seen
    assert kwargs["guidance_rescale"] == 0.7 and scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox --w 64 --h 64 --ss heun\n", encoding="utf-8")
    assert main(["generate", "--model", str(folder), "--prompts", str(prompts), "--steps", "2", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2  # refused before the first picture, not half-way
    assert "sampler 'heun' cannot sample this zero-terminal-SNR base" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.png"))


def test_generate_sweep_and_refusals_from_the_command_line(tiny_xl, xl_lora, tmp_path, capsys):
    from test_use_generate import parse_parameters

    common = ["generate", "--model", str(tiny_xl), "--prompt", "a (red:1.2) fox", "--w", "64", "--h", "64",
              "--steps", "2", "--seed", "2", "--sampler", "ddim", "--quiet"]
    assert main([*common, "--lora", f"{xl_lora}:0.7", "--out", str(tmp_path / "a")]) == 0
    (plain_path,) = (tmp_path / "a").glob("0*.png")
    info = parse_parameters(Image.open(plain_path).text["parameters"])
    assert info["prompt"] == "a (red:1.2) fox <lora:xl:0.7>" and info["Size"] == "64x64" and info["Model"] == tiny_xl.name
    assert len(info["Model hash"]) == 10 and "Original size" not in info
    assert main([*common, "--lora", f"{xl_lora}:0.7", "--out", str(tmp_path / "a"), "--original-size", "1024x1024",
                 "--crop-top-left", "0,16"]) == 0
    (sized_path,) = set((tmp_path / "a").glob("0*.png")) - {plain_path}  # another setting, another file
    sized = parse_parameters(Image.open(sized_path).text["parameters"])
    assert sized["Original size"] == "1024x1024" and sized["Crop top left"] == "0,16"
    assert np.abs(pixels(Image.open(sized_path)) - pixels(Image.open(plain_path))).mean() > 0.5
    capsys.readouterr()

    assert main([*common, "--lora", str(xl_lora), "--sweep", "--weights", "0,1", "--out", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s").glob("sweep-*.png"))) == 1

    assert main([*common, "--clip-skip", "2", "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "lora: error: --clip-skip 2 does not apply to this SDXL base: SDXL already takes the penultimate layer of "
        "both text encoders; leave --clip-skip out")
    for option, value in (("--original-size", "0x512"), ("--original-size", "512"), ("--crop-top-left", "-1,0")):
        with pytest.raises(SystemExit) as exit_:
            main([*common, option, value, "--out", str(tmp_path / "c")])
        assert exit_.value.code == 2 and f"argument {option}: expected " in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory):
    """An SD2.x-like folder: the `tiny` size with an OpenCLIP-style (gelu, `!`-padded) text encoder, linear
    projections in the UNet, v-prediction as SD2-768-v."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorasmith.models.tiny import SIZES, save_pipeline, sd_scheduler
    from lorasmith.models.tokenizer import OPENCLIP_PAD, clip_tokenizer

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(OPENCLIP_PAD)
    text = CLIPTextModel(CLIPTextConfig(**{**SIZES["tiny"]["text"], "vocab_size": 49408}, hidden_act="gelu",
                                        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **{**SIZES["tiny"]["unet"], "use_linear_projection": True,
                                                                    "attention_head_dim": (1, 1)})
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **SIZES["tiny"]["vae"])
    scheduler = sd_scheduler().from_config(sd_scheduler().config, prediction_type="v_prediction")
    return save_pipeline(tmp_path_factory.mktemp("sd2") / "tiny-sd2", tokenizer, text, vae, unet, scheduler)


def test_an_sd2_base_generates_and_ignores_size_conditioning_with_a_warning(tiny_sd2, tmp_path, capsys):
    from lorasmith.models.base import inspect_base

    assert inspect_base(str(tiny_sd2))[0] == "sd2"
    common = ["generate", "--model", str(tiny_sd2), "--prompt", "a fox, (snow:1.3)", "--negative", "", "--w", "64",
              "--h", "64", "--steps", "2", "--seed", "1", "--clip-skip", "2", "--quiet"]
    assert main([*common, "--out", str(tmp_path)]) == 0
    assert main([*common, "--out", str(tmp_path), "--original-size", "1024x1024"]) == 0
    out = capsys.readouterr()
    assert "this SD2.x base has no such input: ignored" in out.err and "0 picture(s) written, 1 already there" in out.out
    (picture,) = tmp_path.glob("0*.png")
    assert Image.open(picture).size == (64, 64) and "Clip skip: 2" in Image.open(picture).text["parameters"]


def test_a_single_file_sdxl_base_draws_as_its_folder(tiny_xl, plain, tmp_path):
    from lorasmith.models.checkpoint import original_state_dict, save_checkpoint

    parts = load_components(str(tiny_xl), ("text_encoder", "text_encoder_2", "vae", "unet"), families=("sdxl",))
    file = save_checkpoint(tmp_path / "xl.safetensors",
                           original_state_dict(parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2), {})
    assert main(["generate", "--model", str(file), "--prompt", "a (fox:1.2)", "--negative", "blurry", "--w", "64",
                 "--h", "64", "--steps", "2", "--seed", "1", "--sampler", "ddim", "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    (picture,) = (tmp_path / "out").glob("0*.png")
    folder = plain.draw(Prompt("a (fox:1.2)", "blurry", 64, 64, steps=2), 1, {}, "ddim")
    assert np.abs(pixels(Image.open(picture)) - pixels(folder)).max() <= 1
