"""v-prediction and zero-terminal-SNR bases (NoobAI-XL v-pred), and long captions (max_token_length): the noise
schedule against an independent computation, what a base declares against what a preset says, Kohya's chunking
of long captions, and one run of each on the tiny SDXL."""

import math

import numpy as np
import pytest
import torch

from conftest import small_dataset, write_preset
from lorasmith.models.base import Declared
from lorasmith.models.from_file import sd_scheduler
from lorasmith.train.config import ConfigError, ModelConfig, TrainingConfig
from lorasmith.train.objective import noise_schedule

V = ModelConfig(prediction_type="v_prediction")
MARKED = Declared("v_prediction", True, "its v_pred and ztsnr keys")


def hand_rescaled(beta_start=0.00085, beta_end=0.012, steps=1000) -> np.ndarray:
    """ᾱ of SD's scaled-linear schedule rescaled to zero terminal SNR, by the paper's algorithm 1 in float64:
    √ᾱ shifted so its last value is 0 and scaled so its first is unchanged."""
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, steps) ** 2
    root = np.sqrt(np.cumprod(1 - betas))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    return root ** 2


def test_zero_terminal_snr_schedule_matches_the_paper_and_diffusers():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    scheduler, note = noise_schedule(sd_scheduler(), V, TrainingConfig(zero_terminal_snr=True))
    got = scheduler.alphas_cumprod.double().numpy()
    assert got[-1] == 0 and got[0] == pytest.approx(1 - 0.00085, rel=1e-6)
    assert np.abs(got - hand_rescaled()).max() < 1e-6
    reference = torch.cumprod(1 - rescale_zero_terminal_snr(sd_scheduler().betas), 0)
    assert torch.allclose(scheduler.alphas_cumprod, reference, atol=1e-7)
    assert note == "v-prediction (the preset); zero terminal SNR (the preset)"
    # the objective at the last step: the input is pure noise and the v target is −x₀
    latents, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    last = torch.tensor([999])
    assert torch.equal(scheduler.add_noise(latents, noise, last), noise)
    assert torch.allclose(scheduler.get_velocity(latents, noise, last), -latents)


def test_a_declared_base_sets_the_schedule_and_says_why():
    v = sd_scheduler().from_config(sd_scheduler().config, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    scheduler, note = noise_schedule(v, ModelConfig(), TrainingConfig(), MARKED, "noob-v.safetensors")
    assert scheduler is v
    assert note == ("v-prediction, as noob-v.safetensors declares it (its v_pred and ztsnr keys); zero terminal "
                    "SNR, as noob-v.safetensors declares it (its v_pred and ztsnr keys)")
    plain, note = noise_schedule(sd_scheduler(), ModelConfig(), TrainingConfig())
    assert note == "" and not plain.config.rescale_betas_zero_snr


@pytest.mark.parametrize("model, training, message", [
    (ModelConfig(prediction_type="epsilon"), TrainingConfig(),
     r'^model.prediction_type = "epsilon" contradicts noob-v.safetensors, a v-prediction model \(its v_pred and '
     r"ztsnr keys\): training it for ε would turn its pictures blank; remove the key$"),
    (ModelConfig(), TrainingConfig(zero_terminal_snr=False),
     r"^training.zero_terminal_snr = false contradicts noob-v.safetensors, which has a zero-terminal-SNR schedule "
     r"\(its v_pred and ztsnr keys\): remove the key$"),
])
def test_a_preset_that_contradicts_the_base_is_refused(model, training, message):
    v = sd_scheduler().from_config(sd_scheduler().config, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    with pytest.raises(ConfigError, match=message):
        noise_schedule(v, model, training, MARKED, "noob-v.safetensors")


def test_zero_terminal_snr_on_an_epsilon_base_is_refused():
    with pytest.raises(ConfigError, match=r"^training.zero_terminal_snr needs v-prediction .* base.safetensors is "
                                          r"ε-prediction: set model.prediction_type"):
        noise_schedule(sd_scheduler(), ModelConfig(), TrainingConfig(zero_terminal_snr=True),
                       Declared(None, None, ""), "base.safetensors")


def test_preset_keys_are_typed_and_checked(tmp_path):
    from lorasmith.train.config import load_config

    data = small_dataset(tmp_path / "data", images=1)
    path = write_preset(tmp_path / "p.toml", tmp_path, data, tmp_path / "out",
                        training={"zero_terminal_snr": True}, dataset={"max_token_length": 225})
    config = load_config(path)
    assert (config.training.zero_terminal_snr, config.dataset.max_token_length) == (True, 225)
    assert load_config(path, ["training.zero_terminal_snr=auto", "dataset.max_token_length=150"]).training \
        .zero_terminal_snr == "auto"
    for override, message in [
        ("dataset.max_token_length=100", "dataset.max_token_length = 100 is not one of 75, 150, 225"),
        ("training.zero_terminal_snr=maybe", "training.zero_terminal_snr = 'maybe' must be bool or 'auto'"),
        ("model.prediction_type=epsilon", "training.zero_terminal_snr = true needs v-prediction"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(path, [override])


# -- long captions ------------------------------------------------------------------------------------------

def _words(count: int) -> str:
    return " ".join(f"w{i}" for i in range(count))


def test_long_ids_follow_kohyas_chunks_for_both_padding_conventions():
    from lorasmith.models.text import long_ids
    from lorasmith.models.tokenizer import OPENCLIP_PAD, clip_tokenizer

    for tokenizer in (clip_tokenizer(), clip_tokenizer(OPENCLIP_PAD)):
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        words = tokenizer(_words(100), add_special_tokens=False).input_ids
        ids = long_ids(tokenizer, [_words(100), "a cat"], 150)
        assert ids.shape == (2, 2, 77)
        assert (ids[:, :, 0] == bos).all()
        # a full first chunk ends with the end token; the second holds the rest, then the end, then padding
        assert ids[0, 0, 1:76].tolist() == words[:75] and ids[0, 0, 76] == eos
        rest = words[75:150]
        assert ids[0, 1, 1:1 + len(rest)].tolist() == rest and ids[0, 1, 1 + len(rest)] == eos
        assert (ids[0, 1, 2 + len(rest):] == pad).all()
        # a short caption: its first chunk is exactly the 77-token tokenization; an empty chunk opens with the end
        plain = tokenizer(["a cat"], padding="max_length", max_length=77, truncation=True).input_ids[0]
        assert ids[1, 0].tolist() == plain
        assert ids[1, 1, 1] == eos and (ids[1, 1, 2:] == pad).all()


def test_long_captions_encode_the_words_past_75_and_keep_the_first_chunk(tiny_sd, tiny_xl):
    from lorasmith.models.base import load_components
    from lorasmith.models.families import family_named

    caption = "x" * 100  # the tiny tokenizer has no merges: a token a letter
    sd = load_components(str(tiny_sd), ("tokenizer", "text_encoder"))
    family = family_named("sd1")
    short = family.encode([sd.tokenizer], [sd.text_encoder], [caption, "a cat"], 1)["context"]
    long = family.encode([sd.tokenizer], [sd.text_encoder], [caption, "a cat"], 1, 150)["context"]
    assert long.shape == (2, 152, short.shape[-1])
    assert torch.allclose(long[1, :76], short[1, :76], atol=1e-6)  # a short caption's words read the same
    changed = family.encode([sd.tokenizer], [sd.text_encoder], ["x" * 90 + "z" * 10], 1, 150)["context"]
    assert not torch.allclose(changed[0, 76:], long[0, 76:])  # words past 75 now reach the UNet

    xl = load_components(str(tiny_xl), ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"),
                         families=("sdxl",))
    family = family_named("sdxl")
    parts = ([xl.tokenizer, xl.tokenizer_2], [xl.text_encoder, xl.text_encoder_2])
    short = family.encode(*parts, [_words(100)], 1)
    long = family.encode(*parts, [_words(100)], 1, 225)
    assert long["context"].shape == (1, 227, 64)
    assert torch.allclose(long["pooled"], short["pooled"], atol=1e-6)  # the first chunk's, as sd-scripts and A1111


# -- one run --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def noob_v(tmp_path_factory, tiny_xl):
    """The tiny SDXL as a single file marked v-prediction with a zero-terminal-SNR schedule, as NoobAI-XL v-pred."""
    from lorasmith.models.base import load_components
    from lorasmith.models.checkpoint import original_state_dict, save_checkpoint

    root = tmp_path_factory.mktemp("noob")
    parts = load_components(str(tiny_xl), ("text_encoder", "text_encoder_2", "vae", "unet"), families=("sdxl",))
    state = original_state_dict(parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2)
    state.update({"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)})
    return save_checkpoint(root / "noob-v.safetensors", state, {})


def test_a_marked_v_prediction_base_trains_and_samples_with_its_schedule(noob_v, tmp_path):
    from safetensors import safe_open

    from lorasmith.models.base import describe_base
    from lorasmith.train.config import load_config
    from lorasmith.train.trainer import run

    assert describe_base(str(noob_v), ("sdxl",)) == ("base model: noob-v.safetensors, a single-file SDXL base "
                                                     "(v-prediction, zero terminal SNR) checkpoint")
    data = small_dataset(tmp_path / "data", images=2, size=(64, 64))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(_words(80) + " --w 64 --h 64 --s 2\n", encoding="utf-8")
    path = write_preset(tmp_path / "p.toml", noob_v, data, tmp_path / "out",
                        dataset={"resolution": 64, "max_bucket_reso": 128, "max_token_length": 150},
                        training={"max_train_steps": 2, "train_batch_size": 1},
                        sample={"sample_prompts": str(prompts), "sample_at_first": True})
    lines = []
    result, _ = run(load_config(path), progress=False, log=lines.append)
    assert ("noise schedule: v-prediction, as noob-v.safetensors declares it (its v_pred and ztsnr keys); zero "
            "terminal SNR, as noob-v.safetensors declares it (its v_pred and ztsnr keys)") in lines
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    with safe_open(str(tmp_path / "out" / "test.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert (meta["modelspec.prediction_type"], meta["ss_zero_terminal_snr"], meta["ss_max_token_length"]) == (
        "v_prediction", "True", "150")
    grids = sorted((tmp_path / "out" / "test.samples").glob("*-grid.png"))
    assert len(grids) == 2
    from PIL import Image

    sample = np.asarray(Image.open(grids[0]).convert("L"), dtype=float)
    assert sample.std() > 1  # drawn, not the grey tile a non-finite sample becomes
