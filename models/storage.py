"""Frozen base weights stored in fp8 and computed in the run's precision, layer by layer (sd-scripts'
`--fp8_base`, OneTrainer's and ai-toolkit's float8 base): a frozen SDXL UNet takes 2.6 GB instead of 5.1 GB in
bf16, so it fits a 12 GB card beside its activations.

Each Linear and convolution keeps its weight as `float8_e4m3fn` under a torch parametrization that casts it up
whenever the layer reads it. The cast is a new tensor, so autograd saves it for the backward pass and the fp8
original is never touched. (diffusers' layerwise casting, made for inference, swaps the weights in place
around each forward: the backward pass then finds fp8 weights and fails.) Norms, embeddings and biases keep
the run's precision; adapters are added afterwards and stay fp32.
"""

from __future__ import annotations

FP8 = "float8_e4m3fn"


def to_precision(model, device=None, dtype=None):
    """`model` moved and cast by torch's own Module.to: diffusers' override warns on every cast that "modules ...
    should be kept in float32: []", naming none (our models keep no module in fp32 by that mechanism)."""
    import torch

    return torch.nn.Module.to(model, *[x for x in (device, dtype) if x is not None])


def _upcast(dtype):
    import torch

    class Upcast(torch.nn.Module):
        def forward(self, stored):
            return stored.to(dtype)

    return Upcast()


def store_in_fp8(model, compute_dtype) -> int:
    """Every frozen Linear/conv weight of `model` stored in fp8, read as `compute_dtype`; the number of weights
    (elements) now stored in fp8. Call before adapters are added: adapters must stay full precision."""
    import torch
    from torch.nn.utils import parametrize

    stored = 0
    for module in list(model.modules()):
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not parametrize.is_parametrized(module):
            module.weight = torch.nn.Parameter(module.weight.detach().to(getattr(torch, FP8)), requires_grad=False)
            parametrize.register_parametrization(module, "weight", _upcast(compute_dtype), unsafe=True)
            stored += module.parametrizations.weight.original.numel()
    return stored
