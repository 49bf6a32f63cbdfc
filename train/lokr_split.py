"""LoKr Kronecker splits that LyCORIS' own loader reads back.

A LoKr file does not store its factor: LyCORIS' loader (`LokrModule.make_module_from_state_dict`, used by
sd-scripts' lycoris.kohya and `create_lycoris_from_weights`) guesses it from the tensor shapes, rebuilds the
layer with that factor and copies the tensors in, failing on any shape mismatch. For a 3×3 convolution it
measures the input side on the flattened lokr_w2_b, kernel included, so an even split can be guessed wrong:
SD1.5's up_blocks.2.resnets.0.conv1 (640 × 1920) at factor -1 has lokr_w1 (20, 40), which the loader rebuilds
as (16, 40). Such a layer takes instead the most even split whose factor divides both sides and which the guess
recovers (factor 1 always is). A1111, ComfyUI and lorasmith multiply the tensors as stored: any split reads.
"""

from __future__ import annotations

import copy
from math import isqrt, prod


def _peft_split(dim: int, factor: int) -> tuple[int, int]:
    from peft.tuners.lokr.layer import factorization

    return factorization(dim, factor)


def _guessed_factor(w1: tuple[int, int], w2: tuple[int, int]) -> int:
    """The factor LyCORIS' loader infers from lokr_w1's shape and lokr_w2's (or w2_a rows × w2_b columns)."""
    from lycoris.functional import factorization

    out, in_ = w1[0] * w2[0], w1[1] * w2[1]
    if w1[0] == factorization(out, -1)[0] and w1[1] == factorization(in_, -1)[0]:
        return -1
    for f in (max(w1), max(w2)):
        if out % f == 0 and in_ % f == 0 and f in (w1[0], w2[0]) and f in (w1[1], w2[1]):
            return f
    return min(max(w1), max(w2))


def reads_back(out: int, in_: int, kernel: int, rank: int, factor: int) -> bool:
    """Whether LyCORIS' loader rebuilds the split peft makes of an out × in_ layer (kernel: its kernel's
    size, 1 for a Linear) at `factor` and `rank` (no Tucker form, w1 whole as lorasmith trains it)."""
    from lycoris.functional import factorization

    (a, b), (c, d) = _peft_split(out, factor), _peft_split(in_, factor)
    whole = rank >= max(b, d) / 2  # lokr_w2 whole keeps the kernel in its own axes
    guess = _guessed_factor((a, c), (b, d if whole else d * kernel))
    return factorization(out, guess) == (a, b) and factorization(in_, guess) == (c, d)


def loadable_factor(out: int, in_: int, kernel: int, rank: int, factor: int) -> int:
    """`factor` when LyCORIS' loader reads its split back, else the largest factor dividing both sides (at
    most `factor` when that is positive) whose split it does; 1 always does."""
    common = (f for f in range(isqrt(min(out, in_)), 0, -1)
              if out % f == 0 and in_ % f == 0 and (factor < 0 or f <= factor))
    return next(f for f in (factor, *common) if reads_back(out, in_, kernel, rank, f))


def use_loadable_splits(model, config) -> int:
    """Rebuild `model`'s LoKr layers (peft's, from `config`) whose split LyCORIS' loader would read wrong,
    with a factor it reads back; the count. They are fresh (ΔW = 0), so nothing trained is lost."""
    import torch
    from peft.tuners.lokr import LoKrLayer

    count = 0
    for layer in model.modules():
        if not isinstance(layer, LoKrLayer) or layer.lokr_t2:
            continue
        base = layer.get_base_layer()
        if isinstance(base, torch.nn.Conv2d):
            out, in_, kernel = base.out_channels, base.in_channels // base.groups, prod(base.kernel_size)
        else:
            out, in_, kernel = base.out_features, base.in_features, 1
        for adapter, rank in list(layer.r.items()):
            factor = loadable_factor(out, in_, kernel, rank, config.decompose_factor)
            if factor == config.decompose_factor:
                continue
            for name in layer.adapter_layer_names:
                if adapter in getattr(layer, name):
                    del getattr(layer, name)[adapter]
            split = copy.copy(config)
            split.decompose_factor = factor
            layer.update_layer(adapter, rank, layer.alpha[adapter], config=split)
            count += 1
    return count
