"""Flux.1's transformer in BFL's single-file layout: written and read back bit-identical at any width, and
written exactly as diffusers' own converter reads it at Flux.1's real width."""

import torch

from lorasmith.models import flux_file


def test_a_tiny_transformer_round_trips_through_bfl_layout_bit_identical(tiny_flux):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    tensors = flux_file.bfl_state_dict(model)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert shapes["double_blocks.0.img_attn.qkv.weight"] == (96, 32)
    assert shapes["single_blocks.0.linear1.weight"] == (3 * 32 + 128, 32)
    assert flux_file.transformer_config(shapes) == {**{k: model.config[k] for k in (
        "patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
        "joint_attention_dim", "pooled_projection_dim", "guidance_embeds")}, "out_channels": 64,
        "axes_dims_rope": tuple(model.config.axes_dims_rope)}
    back = flux_file.load_transformer(tensors, shapes, "tiny.safetensors")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    prefixed = {f"model.diffusion_model.{k}": v for k, v in tensors.items()}  # ComfyUI's full-checkpoint layout
    assert flux_file.is_bfl_transformer(prefixed) and not flux_file.is_bfl_transformer({"x.weight": 1})


def test_full_width_file_is_what_diffusers_converter_reads():
    """One double and one single block at Flux.1's width (3072, heads of 128, MLP 12288), every row of every
    tensor marked: diffusers' convert_flux_transformer_checkpoint_to_diffusers gives back exactly the model's
    state, so q, k, v, the MLP input and the final modulation's halves sit where BFL's files keep them."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with init_empty_weights():
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=64,
                                       pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for i, tensor in enumerate(model.state_dict().values()):  # row r of tensor i holds i + r mod 97
            rows = (torch.arange(tensor.shape[0]) % 97 + i % 150).to(tensor.dtype)
            tensor.copy_(rows.view(-1, *[1] * (tensor.dim() - 1)).expand_as(tensor))
    ours = model.state_dict()
    converted = convert_flux_transformer_checkpoint_to_diffusers(flux_file.bfl_state_dict(model))
    assert set(converted) == set(ours)
    assert all(torch.equal(converted[k], ours[k]) for k in ours)
