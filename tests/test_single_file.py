"""Single-file checkpoints in the original layout: family and diffusers configs from the tensors alone.

Full-size SD1.5, SD2.1-v and SDXL base are built on the meta device (real key sets and shapes, no memory); tiny
models carry real weights, so diffusers' converters can load them into models built from the inferred configs.
"""

from __future__ import annotations

import pytest
import torch

from lorasmith.models.single_file import (CheckpointError, Family, detect_family, read_checkpoint, text_configs,
                                         unet_config, vae_config)
from lorasmith.models.checkpoint import (TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, original_key, original_state_dict,
                                      unet_modules, vae_modules)

DOWN, UP = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
OPEN_CLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024)
OPEN_CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
MODELS = {
    "sd15": dict(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                  attention_head_dim=8, sample_size=64, down_block_types=DOWN, up_block_types=UP),
        vae=dict(SD_VAE, sample_size=512, scaling_factor=0.18215),
        text=[("clip", CLIP_L)], family=Family("sd1", "epsilon", "SD1.x")),
    "sd21-v": dict(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                  attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True,
                  sample_size=96, down_block_types=DOWN, up_block_types=UP),
        vae=dict(SD_VAE, sample_size=768, scaling_factor=0.18215),
        text=[("cond_stage_model.model.", OPEN_CLIP_H)], family=Family("sd2", "v_prediction", "SD2.x (v-prediction)")),
    "sdxl": dict(
        unet=dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                  attention_head_dim=(5, 10, 20), use_linear_projection=True, sample_size=128,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        vae=dict(SD_VAE, sample_size=1024, scaling_factor=0.13025),
        text=[("conditioner.embedders.0.transformer.", CLIP_L), ("conditioner.embedders.1.model.", OPEN_CLIP_BIGG)],
        family=Family("sdxl", "epsilon", "SDXL base")),
}


SDXL_EXTRA = {"add_embedding.linear_1": ("label_emb.0.0", {}), "add_embedding.linear_2": ("label_emb.0.2", {})}
"""SDXL's size-and-pooled-text embedding, which lorasmith's SD1.x writer has no name for."""


def layout(unet=None, vae=None) -> dict:
    """UNet and VAE under their original names; unlike original_state_dict, also for meta tensors."""
    state = {}
    for model, prefix, modules in ((unet, UNET_PREFIX, unet_modules), (vae, VAE_PREFIX, vae_modules)):
        if model is None:
            continue
        table = {**modules(model), **SDXL_EXTRA}
        for key, tensor in model.state_dict().items():
            name = original_key(key, table, prefix)
            if ".mid.attn_" in name and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # the original VAE attention projects with 1×1 convolutions
            state[prefix + name] = tensor
    return state


def clip_layout(encoder, prefix: str) -> dict:
    """A transformers CLIP text model under `prefix` in the original layout: transformers' own names below
    `text_model.` for CLIP-L, OpenCLIP's (`resblocks`, fused in_proj, `text_projection` as x @ P) otherwise."""
    sd = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    if prefix == "clip" or prefix.endswith("transformer."):
        head = TEXT_PREFIX if prefix == "clip" else prefix + "text_model."
        return {head + k: v for k, v in sd.items()}
    width = sd["embeddings.token_embedding.weight"].shape[1]
    state = {prefix + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
             prefix + "positional_embedding": sd["embeddings.position_embedding.weight"],
             prefix + "ln_final.weight": sd["final_layer_norm.weight"],
             prefix + "ln_final.bias": sd["final_layer_norm.bias"],
             prefix + "text_projection": (sd["text_projection.weight"].T if "text_projection.weight" in sd
                                          else torch.zeros(width, width, device=sd["final_layer_norm.weight"].device))}
    for i in range(encoder.config.num_hidden_layers):
        old, new = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            state[new + f"attn.in_proj_{kind}"] = torch.cat([sd[old + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                                 ("attn.out_proj", "self_attn.out_proj"), ("mlp.c_proj", "mlp.fc2")):
                state[new + f"{ours}.{kind}"] = sd[old + f"{theirs}.{kind}"]
    return state


def text_model(config: dict, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))


def converted_text(state: dict, prefix: str, model) -> dict:
    """What diffusers' single-file loader hands this text model, with its flattening of CLIPTextModel."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if prefix == "clip" or prefix.endswith("transformer."):
        out = convert_ldm_clip_checkpoint(state)
    else:
        out = convert_open_clip_checkpoint(model, state, prefix=prefix)
    return out if hasattr(model, "text_model") else {k.removeprefix("text_model."): v for k, v in out.items()}


def shapes(model_or_state) -> dict:
    state = model_or_state if isinstance(model_or_state, dict) else model_or_state.state_dict()
    return {k: tuple(v.shape) for k, v in state.items()}


def plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.fixture(scope="module", params=list(MODELS))
def full_size(request):
    """(spec, original-layout state) of a full-size model on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    spec = MODELS[request.param]
    with torch.device("meta"):
        state = layout(UNet2DConditionModel(**spec["unet"]), AutoencoderKL(**spec["vae"]))
        for i, (prefix, config) in enumerate(spec["text"]):
            state.update(clip_layout(text_model(config, projection=i == 1), prefix))
    return spec, state


def test_full_size_family_and_unet(full_size):
    from diffusers import UNet2DConditionModel

    spec, state = full_size
    assert detect_family(state, "model.safetensors") == spec["family"]
    inferred = unet_config(state)
    for key, value in spec["unet"].items():
        assert plain(inferred[key]) == plain(value), key
    assert inferred["in_channels"] == inferred["out_channels"] == 4 and inferred["norm_num_groups"] == 32
    with torch.device("meta"):
        assert shapes(UNet2DConditionModel(**inferred)) == shapes(UNet2DConditionModel(**spec["unet"]))


def test_full_size_vae_and_text(full_size):
    from diffusers import AutoencoderKL

    spec, state = full_size
    inferred = vae_config(state)
    for key, value in spec["vae"].items():
        assert plain(inferred[key]) == plain(value), key
    with torch.device("meta"):
        assert shapes(AutoencoderKL(**inferred)) == shapes(AutoencoderKL(**spec["vae"]))
    configs = text_configs(state, spec["family"])
    assert len(configs) == len(spec["text"])
    for i, (config, (prefix, expected)) in enumerate(zip(configs, spec["text"])):
        if prefix == "cond_stage_model.model.":
            expected = dict(expected, num_hidden_layers=23)  # diffusers drops the block SD2 never reads
        assert {k: config[k] for k in expected} == expected
        with torch.device("meta"):
            model = text_model(config, projection=i == 1)
        assert shapes(converted_text(state, prefix, model)) == shapes(model)


# tiny models with real weights: lorasmith's own, and SD2/SDXL-shaped ones following those families' conventions
TINY_VAE = dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                 vocab_size=100, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
TINY_XL_UNET = dict(block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64, attention_head_dim=(1, 2),
                    use_linear_projection=True, norm_num_groups=32, transformer_layers_per_block=(1, 2),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)


def tiny(kind: str, **unet_changes):
    """(models, original-layout state) of a tiny model with real weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lorasmith.models.tiny import SIZES

    torch.manual_seed(0)
    unet = {"sd1": SIZES["tiny"]["unet"], "sdxl": TINY_XL_UNET,
            "sd2": dict(SIZES["tiny"]["unet"], use_linear_projection=True, attention_head_dim=(1, 1))}[kind]
    unet = UNet2DConditionModel(**dict(unet, **unet_changes)).eval()
    vae = AutoencoderKL(**TINY_VAE).eval()
    quick = dict(TINY_TEXT, hidden_act="quick_gelu", projection_dim=32)
    gelu = dict(TINY_TEXT, hidden_act="gelu", projection_dim=32)
    if kind == "sd1":
        texts = [("clip", text_model(quick, False))]
    elif kind == "sd2":
        texts = [("cond_stage_model.model.", text_model(gelu, False))]
    else:
        texts = [("conditioner.embedders.0.transformer.", text_model(quick, False)),
                 ("conditioner.embedders.1.model.", text_model(gelu, True))]
    state = layout(unet, vae)
    for prefix, model in texts:
        state.update(clip_layout(model.eval(), prefix))
    return unet, vae, texts, state


def test_tiny_sd1_through_lorasmiths_writer():
    """lorasmith's tiny model (16 groups, 4 heads) comes back exactly from the file lorasmith itself writes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lorasmith.models.tiny import SIZES

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SIZES["tiny"]["unet"]).eval()
    vae = AutoencoderKL(**SIZES["tiny"]["vae"]).eval()
    text = text_model(dict(SIZES["tiny"]["text"], vocab_size=514, hidden_act="quick_gelu"), False).eval()
    state = original_state_dict(unet, vae, text)
    family = detect_family(state, "tiny.safetensors")
    assert family == Family("sd1", "epsilon", "SD1.x")
    inferred = unet_config(state)
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
                "down_block_types", "up_block_types", "norm_num_groups"):
        assert plain(inferred[key]) == plain(SIZES["tiny"]["unet"][key]), key
    assert vae_config(state)["norm_num_groups"] == 8
    assert text_configs(state, family)[0]["num_attention_heads"] == 4
    same_outputs(unet, vae, [("clip", text)], state, family)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_tiny_round_trip(kind):
    unet, vae, texts, state = tiny(kind)
    family = detect_family(state, "tiny.safetensors")
    assert family.name == kind
    same_outputs(unet, vae, texts, state, family)


def same_outputs(unet, vae, texts, state, family):
    """Models built from the inferred configs, loaded by diffusers' converters, compute what the originals do."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    config = unet_config(state)
    rebuilt = UNet2DConditionModel(**config).eval()
    assert shapes(rebuilt) == shapes(unet)
    rebuilt.load_state_dict(convert_ldm_unet_checkpoint(state, config), strict=True)
    new_vae = AutoencoderKL(**vae_config(state)).eval()
    new_vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae_config(state)), strict=True)
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=gen)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra = dict(added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=gen),
                                        "time_ids": torch.tensor([[512.0, 512, 0, 0, 512, 512]] * 2)})
    with torch.no_grad():
        pairs = [[m(sample, torch.tensor([500]), context, **extra).sample for m in (unet, rebuilt)],
                 [m.decode(sample).sample for m in (vae, new_vae)]]
        for expected, got in pairs:
            assert expected.abs().max() > 1e-3
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        tokens = torch.tensor([[0, 5, 6, 7, texts[0][1].config.vocab_size - 1, 3]])
        for i, (config, (prefix, original)) in enumerate(zip(text_configs(state, family), texts)):
            model = text_model(config, projection=i == 1).eval()
            model.load_state_dict(converted_text(state, prefix, model), strict=True)
            torch.testing.assert_close(model(tokens)[0], original(tokens)[0], rtol=0, atol=1e-5)


def meta_tiny(kind: str, **unet_changes) -> dict:
    with torch.device("meta"):
        return tiny(kind, **unet_changes)[3]


@pytest.mark.parametrize("extra, expected", [
    ({}, "v_prediction"),                                    # diffusers: an SD2 file is v unless ...
    ({"global_step": torch.tensor(875000)}, "epsilon"),      # ... it is SD2-base's last step
    ({"global_step": torch.tensor(110000)}, "v_prediction"),
])
def test_sd2_prediction(extra, expected):
    family = detect_family({**meta_tiny("sd2"), **extra}, "sd2.ckpt")
    assert (family.name, family.prediction_type) == ("sd2", expected)
    assert family.label == ("SD2.x (v-prediction)" if expected == "v_prediction" else "SD2.x")


def test_v_pred_marker_and_sample_sizes():
    for kind in ("sd1", "sdxl"):
        state = meta_tiny(kind)
        assert detect_family(state, "m.safetensors").prediction_type == "epsilon"
        assert detect_family({**state, "v_pred": torch.zeros(0)}, "m.safetensors").prediction_type == "v_prediction"
    assert [unet_config(meta_tiny(k))["sample_size"] for k in ("sd1", "sd2", "sdxl")] == [64, 96, 128]
    eps = {**meta_tiny("sd2"), "global_step": torch.tensor(875000)}
    assert unet_config(eps)["sample_size"] == 64 and vae_config(eps)["sample_size"] == 512


def lora_state() -> dict:
    return {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0)}


def refiner_state() -> dict:
    state = {k: v for k, v in meta_tiny("sd2").items() if not k.startswith("cond_stage_model.")}
    with torch.device("meta"):
        encoder = text_model(dict(TINY_TEXT, hidden_act="gelu", projection_dim=32), True)
    return {**state, **clip_layout(encoder, "conditioner.embedders.0.model.")}


@pytest.mark.parametrize("make, words", [
    (lambda: {k.removeprefix(VAE_PREFIX): v for k, v in meta_tiny("sd1").items() if k.startswith(VAE_PREFIX)},
     "holds only a VAE"),
    (lambda: {k: v for k, v in meta_tiny("sd1").items() if k.startswith(VAE_PREFIX)}, "holds only a VAE"),
    (lora_state, "is a LoRA"),
    (refiner_state, "SDXL refiner"),
    (lambda: meta_tiny("sd1", in_channels=9), "inpainting model"),
    (lambda: meta_tiny("sdxl", in_channels=9), "inpainting model"),
    (lambda: meta_tiny("sd1", in_channels=8), "8 input channels"),
    (lambda: {k: v for k, v in meta_tiny("sd1").items() if not k.startswith(UNET_PREFIX)}, "has no UNet"),
    (lambda: {k: v for k, v in meta_tiny("sd1").items() if not k.startswith(TEXT_PREFIX)}, "no text encoder"),
    (lambda: {k: v for k, v in meta_tiny("sd1").items() if not k.startswith(VAE_PREFIX)}, "has no VAE"),
    (lambda: {UNET_PREFIX + "joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(3, 1)}, "not an SD1.x"),
])
def test_refusals_name_the_file(make, words):
    with pytest.raises(CheckpointError) as caught:
        detect_family(make(), "some model.safetensors")
    message = str(caught.value)
    assert message.startswith("some model.safetensors ") and words in message
    assert message.count(". ") == 0 and "\n" not in message  # one sentence


def test_safetensors_and_tensor_only_ckpt(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in tiny("sd2")[3].items()}
    save_file(state, str(tmp_path / "m.safetensors"))
    got = read_checkpoint(tmp_path / "m.safetensors")
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    torch.save({"state_dict": state, "global_step": 875000, "epoch": 3}, tmp_path / "m.ckpt")
    got = read_checkpoint(tmp_path / "m.ckpt")
    assert got.keys() == state.keys() | {"global_step"}
    assert detect_family(got, "m.ckpt").prediction_type == "epsilon"
    torch.save(state, tmp_path / "flat.pt")
    assert read_checkpoint(tmp_path / "flat.pt").keys() == state.keys()


class Callback:
    """Stands for the Lightning objects old training checkpoints carry; unpickling it would touch a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class Holder:
    """A plain custom class instance."""


@pytest.mark.parametrize("thing", ["callback", "holder"])
def test_ckpt_with_python_objects_is_refused_and_nothing_runs(tmp_path, thing):
    marker = tmp_path / "ran"
    extra = Callback(marker) if thing == "callback" else Holder()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callbacks": extra}, tmp_path / "X.ckpt")
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(tmp_path / "X.ckpt")
    assert str(caught.value) == (
        "X.ckpt holds Python objects besides tensors; lorasmith never unpickles code: convert it to .safetensors "
        "(e.g. in ComfyUI or with diffusers) and pass that")
    assert not marker.exists()


def test_unreadable_files(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    for name in ("junk.ckpt", "junk.safetensors"):
        with pytest.raises(CheckpointError, match=f"^{name} is not a readable"):
            read_checkpoint(tmp_path / name)
