"""LoRA arithmetic on whole files: SVD to a lower rank, and several files concatenated into one.

Both keep the meaning of a file exactly where they can: concatenating ranks is exact; SVD keeps the best
rank-r approximation of ΔW (Eckart–Young) and says how much of ΔW's Frobenius norm survived.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorasmith.lorafile.read import Lora, Module


@dataclass(frozen=True)
class Kept:
    key: str
    rank_before: int
    rank_after: int
    share: float
    """‖ΔW_r‖_F / ‖ΔW‖_F: 1.0 when nothing was lost."""


def rank_for_share(singular, share: float, cap: int) -> int:
    """The smallest rank whose part of ΔW keeps at least `share` of its Frobenius norm (Kohya's `sv_fro`),
    at most `cap`."""
    import torch

    energy = singular.double() ** 2
    total = float(energy.sum())
    if total == 0:
        return 1
    kept = torch.sqrt(torch.cumsum(energy, 0) / total)
    rank = int(torch.searchsorted(kept, torch.tensor(share - 1e-12, dtype=kept.dtype)).item()) + 1
    return max(1, min(rank, cap, singular.numel()))


def factor(delta, rank: int | None = None, share: float | None = None, alpha_per_rank: float = 1.0
           ) -> tuple[Module, float]:
    """ΔW (2-D or a conv's 4-D weight) as the module of rank `rank` (or the rank `share` asks for, capped by
    `rank`) that comes closest, and the share of ΔW it keeps. The file's scale alpha/rank is
    `alpha_per_rank`; singular values are split evenly between up and down to keep both well scaled."""
    import torch

    out, rest = delta.shape[0], delta.shape[1:]
    matrix = delta.float().reshape(out, -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    cap = min(rank or s.numel(), s.numel())
    r = rank_for_share(s, share, cap) if share is not None else cap
    total = float(torch.linalg.vector_norm(s))
    kept = float(torch.linalg.vector_norm(s[:r])) / total if total else 1.0
    root = torch.sqrt(s[:r] / alpha_per_rank)
    up = (u[:, :r] * root).reshape(out, r, *([1] * (len(rest) - 1)))
    down = (root[:, None] * vh[:r]).reshape(r, *rest)
    return Module(down.contiguous(), up.contiguous(), alpha_per_rank * r), kept


def resize(lora: Lora, rank: int, share: float | None = None) -> tuple[Lora, list[Kept]]:
    """Every module at `rank` (or at the rank that keeps `share` of its ΔW, up to `rank`), keeping each
    module's scale alpha/rank so strengths users know still mean the same."""
    modules, report = {}, []
    for key, module in sorted(lora.modules.items()):
        # ΔW has at most the module's rank: SVD past it would only pad the file with zero singular values.
        new, kept = factor(module.delta(), min(rank, module.rank), share, module.scale)
        modules[key] = new
        report.append(Kept(key, module.rank, new.rank, kept))
    return Lora(lora.name, modules, dict(lora.metadata), lora.format), report


def dylora_unit(lora: Lora) -> int:
    """A DyLoRA file's unit (Kohya's `networks.dylora` with its `unit` argument), 0 for any other file."""
    import json

    from lorasmith.lorafile.metadata import DYLORA_MODULE

    if lora.metadata.get("ss_network_module") != DYLORA_MODULE:
        return 0
    try:
        return int(json.loads(lora.metadata.get("ss_network_args") or "{}").get("unit", 1))
    except (ValueError, TypeError, AttributeError):
        return 1


def truncate(lora: Lora, rank: int) -> Lora:
    """A DyLoRA's first `rank` ranks of every module, alpha kept: training ran each such prefix alone at
    alpha / rank, which is how loaders apply the sliced file (Kohya's extract_lora_from_dylora does the same)."""
    modules = {key: Module(m.down[:rank].contiguous(), m.up[:, :rank].contiguous(), m.alpha, m.alpha_given)
               for key, m in sorted(lora.modules.items())}
    return Lora(lora.name, modules, dict(lora.metadata), lora.format)


def concatenate(loras: list[tuple[Lora, float]], name: str) -> Lora:
    """One file whose ΔW per module is Σ weightᵢ·ΔWᵢ exactly: downs stacked, ups side by side with each file's
    weight × scale folded in, alpha = the summed rank (scale 1)."""
    import torch

    modules: dict[str, list] = {}
    for lora, weight in loras:
        for key, module in lora.modules.items():
            modules.setdefault(key, []).append((module, weight))
    merged = {}
    for key, parts in sorted(modules.items()):
        shapes = {m.weight_shape for m, _ in parts}
        if len(shapes) > 1:
            from lorasmith.lorafile.read import LoraError

            raise LoraError(f"{key} has different shapes in the files ({', '.join(map(str, shapes))}): "
                            "they were made for different base models")
        down = torch.cat([m.down.float() for m, _ in parts], 0)
        up = torch.cat([m.up.float() * (m.scale * w) for m, w in parts], 1)
        merged[key] = Module(down, up, float(down.shape[0]))
    return Lora(name, merged, {}, "kohya")


def svd_merge(loras: list[tuple[Lora, float]], name: str, rank: int) -> tuple[Lora, list[Kept]]:
    """The summed ΔW of the files, factored again at `rank` (Kohya's svd_merge_lora)."""
    summed = concatenate(loras, name)
    modules, report = {}, []
    for key, module in summed.modules.items():
        new, kept = factor(module.delta(), rank, None, 1.0)
        modules[key] = new
        report.append(Kept(key, module.rank, new.rank, kept))
    return Lora(name, modules, {}, "kohya"), report
