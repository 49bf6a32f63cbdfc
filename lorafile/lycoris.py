"""LyCORIS' LoHa and LoKr modules read as exact LoRA factors, so generating, merging, resizing and inspecting
treat them as any LoRA, with no second code path.

Products of low-rank factors are low-rank themselves:
- LoHa: (A1·B1) ⊙ (A2·B2) = U·D with U[o, (p,q)] = A1[o,p]·A2[o,q] and D[(p,q), i] = B1[p,i]·B2[q,i] (the
  face-splitting product): rank r1·r2.
- LoKr: kron(A1·B1, A2·B2) = kron(A1, A2) · kron(B1, B2): rank r1·r2, a whole factor W counting as W·I.
The scale is LyCORIS': alpha / rank for LoHa and for a LoKr with a decomposed factor, 1 when both Kronecker
factors are whole; a missing alpha means alpha = rank.
"""

from __future__ import annotations

import re

from lorasmith.lorafile.lora import Module

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
_THREE_BY_THREE = re.compile(r"(resnets_\d+_conv[12]|(down|up)samplers_0_conv|in_layers_2|out_layers_3|"
                             r"input_blocks_\d+_0_op|output_blocks_\d+_\d+_conv)$")
"""Kohya names of the 3×3 convolutions a LoCon-style module can adapt (diffusers and SGM names). LyCORIS stores
their factors flattened to (rank, in·3·3): the name says how to fold them back."""


def _whole(weight):
    """A whole matrix W as the pair (up, down) with up·down = W, at its smaller side's rank."""
    import torch

    rows, cols = weight.shape
    if rows <= cols:
        return torch.eye(rows, dtype=weight.dtype), weight
    return weight, torch.eye(cols, dtype=weight.dtype)


def loha_factors(parts: dict):
    """(up, down, scale) of a LoHa module, flattened to 2-D."""
    w1a, w1b, w2a, w2b = (parts[name].float().flatten(1) for name in LOHA)
    up = (w1a[:, :, None] * w2a[:, None, :]).reshape(w1a.shape[0], -1)
    down = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, w1b.shape[1])
    rank = w1b.shape[0]
    return up, down, _alpha(parts, rank) / rank


def lokr_factors(parts: dict):
    """(up, down, scale) of a LoKr module, flattened to 2-D."""
    import torch

    pairs, rank = [], None
    for side in ("lokr_w1", "lokr_w2"):
        if side in parts:
            pairs.append(_whole(parts[side].float().flatten(1)))
        else:
            a, b = parts[f"{side}_a"].float(), parts[f"{side}_b"].float().flatten(1)
            pairs.append((a, b))
            rank = b.shape[0]
    (a1, b1), (a2, b2) = pairs
    scale = _alpha(parts, rank) / rank if rank else 1.0
    return torch.kron(a1, a2), torch.kron(b1, b2), scale


def _alpha(parts: dict, rank: int | None) -> float:
    return float(parts["alpha"].item()) if "alpha" in parts else float(rank or 1)


def lycoris_missing(parts: dict) -> str:
    """The first tensor a LoHa or LoKr module needs and lacks, '' when it is complete."""
    if any(name in parts for name in LOHA):
        return next((name for name in LOHA if name not in parts), "")
    for side in ("lokr_w1", "lokr_w2"):
        if side not in parts and not (f"{side}_a" in parts and f"{side}_b" in parts):
            return f"{side} (or {side}_a and {side}_b)"
    return ""


def lycoris_module(key: str, parts: dict):
    """The LoHa or LoKr module `parts` (its tensors by suffix) as a Module of exact down/up factors; for a 3×3
    convolution the factors come back in the layer's 4-D layout."""
    kind = "LoHa" if "hada_w1_a" in parts else "LoKr"
    up, down, scale = loha_factors(parts) if kind == "LoHa" else lokr_factors(parts)
    rank = down.shape[0]
    if _THREE_BY_THREE.search(key) and down.shape[1] % 9 == 0:
        down, up = down.reshape(rank, -1, 3, 3), up.reshape(up.shape[0], rank, 1, 1)
    given = "alpha" in parts or (kind == "LoKr" and "lokr_w1" in parts and "lokr_w2" in parts)  # alpha unused
    return Module(down.contiguous(), up.contiguous(), scale * rank, given, kind)
