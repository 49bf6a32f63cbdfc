"""Flux.1's transformer in BFL's original single-file layout (`flux1-dev.safetensors`, the file ComfyUI keeps in
`models/diffusion_models/`), both ways.

One table says which diffusers tensors each BFL tensor holds: most are one-to-one, q/k/v (and a single block's MLP
input) are concatenated along the output axis, and the final modulation stores (shift, scale) where diffusers
keeps (scale, shift). diffusers reads these files only at Flux.1's real width (its converter hard-codes 3072);
this reads any width, taking the architecture from the tensors' shapes, so a file opens offline.
"""

from __future__ import annotations

import re

GLOBAL = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out",
}
DOUBLE = {  # BFL module inside double_blocks.<i> → diffusers modules inside transformer_blocks.<i>
    "img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"],
}
DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
SINGLE = {"modulation.lin": ["norm.linear"], "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
          "linear2": ["proj_out"]}
SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
SWAPPED = ("final_layer.adaLN_modulation.1", "norm_out.linear")
"""BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous is (scale, shift)."""


def _pairs(blocks: int, singles: int):
    """(BFL tensor name, [diffusers tensor names]) for every tensor of a transformer of this depth."""
    for bfl, ours in GLOBAL.items():
        for kind in ("weight", "bias"):
            yield f"{bfl}.{kind}", [f"{ours}.{kind}"]
    for prefix, ours_prefix, modules, norms, count in (
            ("double_blocks", "transformer_blocks", DOUBLE, DOUBLE_NORMS, blocks),
            ("single_blocks", "single_transformer_blocks", SINGLE, SINGLE_NORMS, singles)):
        for i in range(count):
            for bfl, ours in modules.items():
                for kind in ("weight", "bias"):
                    yield f"{prefix}.{i}.{bfl}.{kind}", [f"{ours_prefix}.{i}.{o}.{kind}" for o in ours]
            for bfl, ours in norms.items():
                yield f"{prefix}.{i}.{bfl}", [f"{ours_prefix}.{i}.{ours}"]


def _swap(tensor):
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def bfl_state_dict(transformer) -> dict:
    """The transformer's weights under BFL's names, fused where BFL fuses them."""
    import torch

    ours = transformer.state_dict()
    config = transformer.config
    out = {}
    for bfl, parts in _pairs(config.num_layers, config.num_single_layers):
        if parts[0] in ours:  # schnell has no guidance_in
            out[bfl] = torch.cat([ours[p] for p in parts]) if len(parts) > 1 else ours[parts[0]]
    for kind in ("weight", "bias"):
        out[f"{SWAPPED[0]}.{kind}"] = _swap(ours[f"{SWAPPED[1]}.{kind}"])
    return {k: v.contiguous() for k, v in out.items()}


def is_bfl_transformer(shapes: dict) -> bool:
    return "double_blocks.0.img_attn.qkv.weight" in _strip(shapes)


def _strip(tensors: dict) -> dict:
    """ComfyUI's full checkpoints prefix the transformer with `model.diffusion_model.`."""
    prefix = "model.diffusion_model."
    if not any(k.startswith(prefix) for k in tensors):
        return tensors
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def transformer_config(shapes: dict) -> dict:
    """FluxTransformer2DModel's constructor arguments read off the tensor shapes."""
    shapes = _strip(shapes)
    count = lambda kind: 1 + max(int(m.group(1)) for k in shapes if (m := re.match(rf"{kind}\.(\d+)\.", k)))  # noqa: E731
    width = shapes["img_in.weight"][0]
    head = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    rope = (16, 56, 56) if head == 128 else (head - 2 * (3 * head // 8), 3 * head // 8, 3 * head // 8)
    return dict(patch_size=1, in_channels=shapes["img_in.weight"][1], out_channels=shapes["final_layer.linear.weight"][0],
                num_layers=count("double_blocks"), num_single_layers=count("single_blocks"),
                attention_head_dim=head, num_attention_heads=width // head,
                joint_attention_dim=shapes["txt_in.weight"][1], pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
                guidance_embeds="guidance_in.in_layer.weight" in shapes, axes_dims_rope=rope)


def diffusers_state_dict(tensors: dict, config: dict) -> dict:
    """BFL tensors under diffusers' names, fused tensors split by the parts' widths (q, k, v: the model's width;
    the MLP input: 4 × that)."""
    tensors = _strip(tensors)
    width = config["attention_head_dim"] * config["num_attention_heads"]
    out = {}
    for bfl, parts in _pairs(config["num_layers"], config["num_single_layers"]):
        if bfl not in tensors:
            continue
        if len(parts) == 1:
            out[parts[0]] = tensors[bfl]
            continue
        sizes = [width] * 3 + ([tensors[bfl].shape[0] - 3 * width] if len(parts) == 4 else [])
        out.update(zip(parts, tensors[bfl].split(sizes)))
    for kind in ("weight", "bias"):
        out[f"{SWAPPED[1]}.{kind}"] = _swap(tensors[f"{SWAPPED[0]}.{kind}"])
    return out


def load_transformer(tensors: dict, shapes: dict, name: str):
    """A FluxTransformer2DModel from a BFL-layout file's tensors, its architecture read from their shapes."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from lorasmith.models.single_file import CheckpointError

    config = transformer_config(shapes)
    with init_empty_weights():
        model = FluxTransformer2DModel(**config)
    state = diffusers_state_dict(tensors, config)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise CheckpointError(f"{name} lacks {missing[0]} ({len(missing)} tensors): it is not a whole Flux.1 "
                              "transformer file")
    model.load_state_dict(state, assign=True, strict=True)
    return model
