"""Original-layout checkpoints: diffusers' own single-file loader must give back the same models."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from lorasmith.models.checkpoint import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, original_state_dict, save_checkpoint

PREFIXES = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from lorasmith.models.tiny import build_sd

    return build_sd(tmp_path_factory.mktemp("checkpoint") / "base", "tiny", seed=0)


@pytest.fixture(scope="module")
def parts(base):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return (UNet2DConditionModel.from_pretrained(base / "unet").eval(),
            AutoencoderKL.from_pretrained(base / "vae").eval(),
            CLIPTextModel.from_pretrained(base / "text_encoder").eval())


@pytest.fixture(scope="module")
def state(parts):
    return original_state_dict(*parts)


@pytest.fixture(scope="module")
def checkpoint(base, state):
    return save_checkpoint(base.parent / "model.safetensors", state, {"modelspec.title": "tiny"})


@pytest.fixture
def offline(monkeypatch):
    """No hub: the env switch, and a socket that refuses, so a config fetched from the hub fails the test."""
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def outputs(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=gen)
    context = torch.randn(1, 5, unet.config.cross_attention_dim, generator=gen)
    image = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    tokens = torch.tensor([[text_encoder.config.bos_token_id, 70, 71, 72, text_encoder.config.eos_token_id]])
    with torch.no_grad():
        return {
            "unet": unet(sample, torch.tensor([417]), encoder_hidden_states=context).sample,
            "decode": vae.decode(sample).sample,
            "encode": vae.encode(image).latent_dist.mean,
            "text": text_encoder(tokens).last_hidden_state,
        }


def test_diffusers_single_file_loader_gives_back_the_same_models(base, parts, checkpoint, offline):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(base), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    expected = outputs(*parts)
    got = outputs(pipe.unet, pipe.vae, pipe.text_encoder)
    for name, value in expected.items():
        assert value.abs().max() > 1e-3, name  # a zero output would make the comparison empty
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=name)


def test_every_weight_is_there_once_under_an_original_name(parts, state, checkpoint):
    from safetensors import safe_open

    unet, vae, text_encoder = parts
    with safe_open(str(checkpoint), "pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata() == {"modelspec.title": "tiny"}
        attention = {k: tuple(handle.get_slice(k).get_shape())
                     for k in keys if ".mid.attn_1." in k and k.endswith("weight")}
    assert keys == set(state)
    assert all(k.startswith(PREFIXES) for k in keys)
    sizes = [len(unet.state_dict()), len(vae.state_dict()), len(text_encoder.state_dict())]
    assert [sum(k.startswith(p) for k in keys) for p in PREFIXES] == sizes
    # tiny: two UNet levels of one layer; attention in down block 0, the mid block and up block 1
    assert {UNET_PREFIX + k for k in ("input_blocks.1.1.proj_in.weight", "input_blocks.2.0.op.weight",
                                      "input_blocks.3.0.skip_connection.weight", "middle_block.1.proj_out.weight",
                                      "output_blocks.1.1.conv.weight", "output_blocks.3.1.proj_in.weight")} <= keys
    # the original numbers decoder levels from the bottom: diffusers' last up block (no upsampler) is `up.0`
    assert VAE_PREFIX + "decoder.up.0.block.1.conv1.weight" in keys
    assert VAE_PREFIX + "decoder.up.0.upsample.conv.weight" not in keys
    assert TEXT_PREFIX + "final_layer_norm.weight" in keys
    channels = vae.config.block_out_channels[-1]
    assert {shape for k, shape in attention.items() if not k.endswith("norm.weight")} == {(channels, channels, 1, 1)}
    assert len(attention) == 10
    linear = vae.state_dict()["decoder.mid_block.attentions.0.to_q.weight"]
    assert torch.equal(state[VAE_PREFIX + "decoder.mid.attn_1.q.weight"][:, :, 0, 0], linear)


class Name(str):
    """A diffusers key standing in for its tensor, so the converters' output says where each value came from."""

    shape, ndim = (), 0


def test_sd15_layout_inverts_diffusers_conversion():
    """The full SD1.5 shape, on the meta device: diffusers' converters map every name back to where it came from."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from lorasmith.models.tiny import SIZES
    from lorasmith.models.checkpoint import original_key, unet_modules, vae_modules

    spec = SIZES["sd15"]
    with init_empty_weights():
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **spec["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **spec["vae"])
    for model, modules, convert in ((unet, unet_modules(unet), convert_ldm_unet_checkpoint),
                                    (vae, vae_modules(vae), convert_ldm_vae_checkpoint)):
        original = {original_key(key, modules, "part"): Name(key) for key in model.state_dict()}
        prefix = UNET_PREFIX if model is unet else VAE_PREFIX
        back = convert({prefix + k: v for k, v in original.items()}, dict(model.config))
        assert back == {key: key for key in model.state_dict()}
    assert {"output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "input_blocks.9.0.op.weight",
            "output_blocks.11.0.skip_connection.weight"} <= set(
        original_key(k, unet_modules(unet), "UNet") for k in unet.state_dict())


def test_a_failed_write_leaves_no_file(tmp_path, state, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    target = tmp_path / "model.safetensors"
    monkeypatch.setattr(safetensors.torch, "save", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_checkpoint(target, state, {})
    assert os.listdir(tmp_path) == []


def test_a_failed_write_keeps_the_previous_file(tmp_path, state, monkeypatch):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"previous")
    real = os.fsync

    def full(fd):
        real(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        save_checkpoint(target, state, {})
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_fp16_halves_floats(tmp_path, state):
    from safetensors.torch import load_file

    path = save_checkpoint(tmp_path / "half.safetensors", state, {}, dtype=torch.float16)
    loaded = load_file(path)
    assert loaded.keys() == state.keys()
    assert {t.dtype for t in loaded.values()} == {torch.float16}
    assert all(state[k].dtype == torch.float32 for k in state)  # the caller's tensors are not cast in place
    key = UNET_PREFIX + "out.2.weight"
    torch.testing.assert_close(loaded[key], state[key].half())


def test_refusals(parts):
    unet, vae, text_encoder = parts
    extended = copy.deepcopy(unet)
    extended.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))  # e.g. an SDXL embedding
    with pytest.raises(ValueError, match="UNet weight 'extra'"):
        original_state_dict(extended, vae, text_encoder)


def test_sd2_text_encoder_in_open_clip_layout_converts_back_through_diffusers():
    """OpenCLIP's layout (q/k/v joined into in_proj) read back by diffusers' own convert_open_clip_checkpoint
    gives every weight of the model exactly."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorasmith.models.checkpoint import OPEN_CLIP_PREFIX, text_state_dict

    torch.manual_seed(0)
    openclip = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                            num_attention_heads=2, vocab_size=10, hidden_act="gelu"))
    state = text_state_dict(openclip)
    assert all(k.startswith(OPEN_CLIP_PREFIX) for k in state)
    assert state[OPEN_CLIP_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"].shape == (48, 16)
    back = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(openclip, state).items()}
    expected = {k: v for k, v in openclip.state_dict().items() if not k.endswith("position_ids")}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)
