"""LoKr layers that apply kron(w1, w2) to the activations instead of building ΔW (LyCORIS' `kron_bypass`).

peft's LoKr builds every layer's whole ΔW at each forward and keeps it for the backward pass; LyCORIS'
bypass computes w1 · unvec(x) · w2ᵀ on the activations and never builds ΔW. On the SD1.5 UNet's Kohya set
a LoKr training step costs 1.15× a LoRA step this way against 2.07× (bench/network_libraries.py --unet).
peft keeps the parameters, so states, resume, DDP and export do not change: only the product moves.
"""

from __future__ import annotations

from types import MethodType

import torch
from lycoris.functional.lokr import kron_bypass

_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def use_bypass(model) -> int:
    """Route `model`'s LoKr layers through the bypass; Tucker convolutions keep peft's path. The count."""
    from peft.tuners.lokr import LoKrLayer

    count = 0
    for layer in model.modules():
        if isinstance(layer, LoKrLayer) and not layer.lokr_t2:
            layer._get_delta_activations = MethodType(_delta_activations, layer)
            count += 1
    return count


def _delta_activations(self, adapter: str, x, *args, **kwargs):
    """peft's `_get_delta_activations` contract: ΔW·x for one adapter, rank dropout included (peft drops
    rows of ΔW, which is the same as dropping output channels here)."""
    w1, w1a, w1b, w2, w2a, w2b = (getattr(self, name)[adapter] if adapter in getattr(self, name) else None
                                  for name in _FACTORS)
    base = self.get_base_layer()
    conv = isinstance(base, torch.nn.Conv2d)
    extra = {}
    if conv:
        extra = dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)
        if w2b is not None:
            w2b = w2b.reshape(w2b.shape[0], -1, *base.kernel_size)
    x = self._cast_input_dtype(x, (w1 if w1 is not None else w1a).dtype)
    out = kron_bypass(x, w1, w1a, w1b, w2, w2a, w2b, None, scale=self.scaling[adapter], extra_args=extra,
                      backend="torch")
    rate = self.rank_dropout[adapter]
    if self.training and rate:
        drop = (torch.rand(out.shape[1] if conv else out.shape[-1]) > rate).float()
        if self.rank_dropout_scale[adapter]:
            drop /= drop.mean()
        shape = (-1, *([1] * (out.dim() - 2))) if conv else (-1,)
        out = out * drop.to(out).view(shape)
    return out
