"""peft's LoHa/LoKr next to LyCORIS' own modules on one layer (same numbers? how fast?), and LyCORIS' DyLoRA scale.

peft's LoHa and LoKr (peft.tuners.loha / peft.tuners.lokr) are ports of LyCORIS. This bench exists to check,
on one layer at a time, whether the port and the original (lycoris-lora, KohakuBlueleaf/LyCORIS) compute the
same thing, and what each costs to train:

1. Agreement. For LoHa and LoKr on an nn.Linear(320, 320) and an nn.Conv2d(320, 320, 3, padding=1): the peft
   adapter is built, the LyCORIS module is built on an identical copy of the base layer, peft's adapter
   tensors are set to random non-zero values and copied into the LyCORIS tensors of the same names, and the
   two are compared on a fixed input: the adapter part of the output (default and bypass_mode=True forward)
   and ΔW (peft `get_delta_weight("default")`, LyCORIS `get_diff_weight()`, and the `get_weight()` that
   LyCORIS' forward actually applies). LoKr is run with rank 8 (the big factor w2 decomposed) and rank 16
   (both factors full, where LyCORIS drops alpha/r and uses scale 1; peft keeps alpha/r).
2. Speed. Median over --rounds interleaved rounds of forward+backward of one layer shaped like an SD1.5
   attention projection (Linear(320,320) on (B, 4096, 320)) and a 3x3 Conv2d(320,320) on (B, 320, 64, 64):
   the plain layer, peft LoRA/LoHa/LoKr and LyCORIS LoHa/LoKr (default and bypass_mode=True), 2 CPU threads.
3. DyLoRA scale. LyCORIS' DyLoraModule (Linear(64,64), lora_dim 8, alpha 8, block_size 1 and 4): the ΔW it
   trains at each truncated rank against what Kohya / A1111 / ComfyUI compute from a DyLoRA file sliced to that
   many ranks (up[:, :b] @ down[:b] * alpha / b, alpha kept, as kohya's extract_lora_from_dylora.py does), and
   whether its bypass_mode forward runs and matches the default forward.
4. Whole UNet (--unet, run alone). One layer does not say what a training step costs: per-layer overheads
   (ΔW rebuilt in every forward, Kronecker products, bypass paths) add up over the ~160 adapted layers of SD1.5
   while the frozen convolutions do not change. One training step (forward + backward of
   output.float().square().mean(), no optimizer, grads then set to None) of a random-weight UNet with SD1.5's
   architecture (models/tiny.py SIZES["sd15"], 256 px latents (1, 4, 32, 32), context (1, 77, 768)), or the tiny
   one for smoke runs (--unet-size tiny): peft LoRA (the baseline), peft LoKr, LyCORIS LoKr (default and
   bypass_mode=True forward), peft LoHa and LyCORIS LoHa (bypass_mode=True), rank 16, alpha 16, on the layers
   train-lora adapts (unet_targets("kohya", conv=False): Kohya's Linear and 1×1 proj_in/proj_out set, no
   convolution adapters). peft adapters come from the project's adapter_config; LyCORIS' LokrModule/LohaModule
   are built on the same layer names (factor -1, decompose_both off on both sides, so each layer's Kronecker
   factors have the same shapes; checked and printed with the trainable-parameter counts). Each variant lives on
   its own copy of the module tree that shares the frozen base tensors, so the six cost one UNet of memory.
   Median ms per step over --rounds interleaved rounds after one warm-up, 2 CPU threads, float32.

    .venv/bin/python bench/network_libraries.py [--rounds 3] [--batch 2]
    .venv/bin/python bench/network_libraries.py --unet [--unet-size sd15|tiny] [--rounds 5]

lycoris-lora is a dependency (LoKr's bypass, train/lokr_bypass.py); without it the script says so and exits 2.
"""

from __future__ import annotations

import argparse
import copy
import random
import re
import statistics
import sys
import time
import warnings

import torch
from torch import nn

IN = OUT = 320
RANK = 8
ALPHA = 4.0
STD = 0.1  # the random values given to every adapter tensor before comparing
UNET_RANK = 16
UNET_ALPHA = 16.0

PEFT_NAMES = {
    "loha": ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"],
    "lokr": ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"],
}
# peft name -> LyCORIS name. The port kept LyCORIS' names; spelled out so a rename would show as "unmapped".
NAME_MAP = {name: name for names in PEFT_NAMES.values() for name in names}


class Holder(nn.Module):
    """The one-layer model peft injects into (target_modules=["layer"])."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def fit_ratio(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(k, residual): a ≈ k·b by least squares, and max|a - k·b| / max|b|."""
    a, b = a.double().flatten(), b.double().flatten()
    k = float((a @ b) / (b @ b))
    return k, float((a - k * b).abs().max() / b.abs().max())


def base_layer(kind: str) -> nn.Module:
    return nn.Linear(IN, OUT) if kind == "linear" else nn.Conv2d(IN, OUT, 3, padding=1)


def shapes(tensors: dict) -> str:
    return " ".join(f"{n}{tuple(t.shape)}" for n, t in tensors.items())


def adapter_out(layer: nn.Module, org_forward, x: torch.Tensor) -> torch.Tensor:
    return layer(x) - org_forward(x)


# ---------------------------------------------------------------------------------------------- 1. agreement


def agreement_case(algo: str, kind: str, rank: int, alpha: float, lyc) -> tuple[list, list]:
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model

    torch.manual_seed(0)
    base = base_layer(kind).requires_grad_(False)
    lyc_base, byp_base = copy.deepcopy(base), copy.deepcopy(base)
    holder = Holder(base)
    config_class = LoHaConfig if algo == "loha" else LoKrConfig
    inject_adapter_in_model(config_class(r=rank, alpha=alpha, target_modules=["layer"], init_weights=True), holder)
    layer = holder.layer
    module_class = lyc.LohaModule if algo == "loha" else lyc.LokrModule
    default = module_class("default", lyc_base, 1.0, rank, alpha)
    bypass = module_class("bypass", byp_base, 1.0, rank, alpha, bypass_mode=True)
    default.apply_to()
    bypass.apply_to()

    peft_t = {n: getattr(layer, n)["default"] for n in PEFT_NAMES[algo] if "default" in getattr(layer, n, {})}
    lyc_t = dict(default.named_parameters())
    byp_t = dict(bypass.named_parameters())
    generator = torch.Generator().manual_seed(1)
    notes = []
    with torch.no_grad():
        for name, tensor in peft_t.items():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * STD)
            target = NAME_MAP.get(name)
            if target not in lyc_t:
                notes.append(f"{name}: no LyCORIS counterpart")
                continue
            for module_t in (lyc_t, byp_t):
                if module_t[target].shape == tensor.shape:
                    module_t[target].copy_(tensor)
                elif module_t[target].numel() == tensor.numel():
                    module_t[target].copy_(tensor.reshape(module_t[target].shape))
                else:
                    notes.append(f"{name}{tuple(tensor.shape)} vs {tuple(module_t[target].shape)}: cannot map")
            if lyc_t[target].shape != tensor.shape and lyc_t[target].numel() == tensor.numel():
                notes.append(f"{name} reshaped {tuple(tensor.shape)}->{tuple(lyc_t[target].shape)}")
        for name in lyc_t:
            if name not in {NAME_MAP.get(n) for n in peft_t}:
                notes.append(f"LyCORIS {name}: left unset")

    torch.manual_seed(2)
    x = torch.randn(2, 16, IN) if kind == "linear" else torch.randn(1, IN, 8, 8)
    layer.eval(), default.eval(), bypass.eval()
    with torch.no_grad():
        d_peft = adapter_out(layer, layer.get_base_layer(), x)
        d_lyc = adapter_out(lyc_base, default.org_forward, x)
        d_byp = adapter_out(byp_base, bypass.org_forward, x)
        w_peft = layer.get_delta_weight("default")
        w_diff = default.get_diff_weight()[0].reshape(w_peft.shape)
        w_used = (default.get_weight(default.shape) * default.scalar).reshape(w_peft.shape)

    label = f"{algo} {kind} r{rank} a{alpha:g}"
    use = ""
    if algo == "lokr":
        use = "w1 " + ("full" if "lokr_w1" in peft_t else "a@b") + ", w2 " + ("full" if "lokr_w2" in peft_t else "a@b")
    tensor_row = [label, use, shapes(peft_t), "same" if set(lyc_t) == set(peft_t) else shapes(lyc_t),
                  "; ".join(notes) or "all by name, same shapes"]

    def cmp(a, b):
        k, resid = fit_ratio(a, b)
        return f"{(a - b).abs().max().item():.1e}", f"{k:.4g}", f"{resid:.0e}"

    out_diff, out_k, _ = cmp(d_lyc, d_peft)
    byp_diff, byp_k, _ = cmp(d_byp, d_peft)
    diff_diff, diff_k, diff_res = cmp(w_diff, w_peft)
    used_diff, used_k, _ = cmp(w_used, w_peft)
    number_row = [label, f"{layer.scaling['default']:g}", f"{default.scale:g}",
                  f"{d_peft.abs().max().item():.2e}", out_diff, out_k, byp_diff, byp_k,
                  f"{w_peft.abs().max().item():.2e}", used_diff, used_k, diff_diff, diff_k]
    return tensor_row, number_row


def agreement(lyc) -> None:
    print(f"1. Agreement: peft vs LyCORIS on the same layer, float32, adapter tensors ~ N(0, {STD}^2), "
          "copied from peft into LyCORIS by name")
    cases = [("loha", "linear", RANK), ("loha", "conv", RANK), ("lokr", "linear", RANK), ("lokr", "conv", RANK),
             ("lokr", "linear", 16), ("lokr", "conv", 16)]
    tensor_rows, number_rows = [], []
    for algo, kind, rank in cases:
        t, n = agreement_case(algo, kind, rank, ALPHA, lyc)
        tensor_rows.append(t)
        number_rows.append(n)
    print()
    print(table(["case", "LoKr factors", "peft tensors", "LyCORIS tensors", "mapping"], tensor_rows))
    print()
    print("out = adapter part of the output (layer(x) - base(x)); diff = max|LyCORIS - peft|; "
          "ratio = LyCORIS/peft (least squares)")
    print("ΔW fwd = the ΔW LyCORIS' forward applies (get_weight()*scalar); ΔW diff = LyCORIS get_diff_weight()")
    print(table(["case", "peft scale", "LyC scale", "max|out|", "out diff", "out ratio", "bypass diff",
                 "bypass ratio", "max|ΔW|", "ΔW fwd diff", "ΔW fwd ratio", "get_diff diff", "get_diff ratio"],
                number_rows))


# -------------------------------------------------------------------------------------------------- 2. speed


def speed_variants(kind: str, lyc) -> list[tuple[str, nn.Module, list]]:
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    proto = base_layer(kind).requires_grad_(False)
    variants = [("plain base layer", copy.deepcopy(proto), [])]
    configs = [
        ("peft LoRA", LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["layer"])),
        ("peft LoHa", LoHaConfig(r=RANK, alpha=ALPHA, target_modules=["layer"])),
        ("peft LoKr", LoKrConfig(r=RANK, alpha=ALPHA, target_modules=["layer"])),
    ]
    for name, config in configs:
        holder = Holder(copy.deepcopy(proto))
        inject_adapter_in_model(config, holder)
        variants.append((name, holder.layer, [p for p in holder.parameters() if p.requires_grad]))
    for name, module_class, bypass in [
        ("LyCORIS LoHa", lyc.LohaModule, None),
        ("LyCORIS LoHa bypass", lyc.LohaModule, True),
        ("LyCORIS LoKr", lyc.LokrModule, None),
        ("LyCORIS LoKr bypass", lyc.LokrModule, True),
    ]:
        layer = copy.deepcopy(proto)
        module = module_class("m", layer, 1.0, RANK, ALPHA, bypass_mode=bypass)
        module.apply_to()
        layer._bench_module = [module]  # keep it alive next to the layer whose forward it replaced
        variants.append((name, layer, list(module.parameters())))
    return variants


def step(layer: nn.Module, params: list, x: torch.Tensor) -> float:
    for p in params:
        p.grad = None
    x.grad = None
    start = time.perf_counter()
    layer(x).sum().backward()
    return time.perf_counter() - start


def speed(lyc, rounds: int, batch: int) -> None:
    print()
    print(f"2. Speed: forward+backward of one layer, ms, median of {rounds} interleaved rounds after 1 warm-up, "
          f"{torch.get_num_threads()} CPU threads, float32, rank {RANK}, alpha {ALPHA:g}, base weight frozen, "
          "input requires grad")
    shapes_ = {"linear": (batch, 4096, IN), "conv": (batch, IN, 64, 64)}
    if batch != 2:
        print(f"   batch shrunk from SD1.5's 2 to {batch}")
    results = {}
    names = None
    for kind in ("linear", "conv"):
        variants = speed_variants(kind, lyc)
        names = [v[0] for v in variants]
        torch.manual_seed(3)
        x = torch.randn(*shapes_[kind], requires_grad=True)
        times = {name: [] for name in names}
        for _, layer, params in variants:
            step(layer, params, x)
        for r in range(rounds):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            for name, layer, params in order:
                times[name].append(step(layer, params, x))
        results[kind] = {name: statistics.median(t) * 1000 for name, t in times.items()}
    lin, conv = results["linear"], results["conv"]
    rows = [[name, f"{lin[name]:.1f}", f"{lin[name] / lin['peft LoRA']:.2f}", f"{conv[name]:.1f}",
             f"{conv[name] / conv['peft LoRA']:.2f}"] for name in names]
    print(table([
        "variant", f"Linear {shapes_['linear']} ms", "x peft LoRA",
        f"Conv3x3 {shapes_['conv']} ms", "x peft LoRA"], rows))


# ------------------------------------------------------------------------------------------------- 3. DyLoRA


def dylora(lyc) -> None:
    print()
    print("3. DyLoRA: LyCORIS DyLoraModule on Linear(64,64), lora_dim 8, alpha 8, up/down ~ N(0,1)")
    print("   file ΔW_b = up[:, :b] @ down[:b] * alpha / b (a DyLoRA file sliced to b ranks, alpha kept)")
    lora_dim, alpha = 8, 8.0
    rows, bypass_lines = [], []
    for block_size in (1, 4):
        torch.manual_seed(0)
        base = nn.Linear(64, 64).requires_grad_(False)
        byp_base = copy.deepcopy(base)
        module = lyc.DyLoraModule("d", base, 1.0, lora_dim, alpha, block_size=block_size)
        bypass = lyc.DyLoraModule("b", byp_base, 1.0, lora_dim, alpha, block_size=block_size, bypass_mode=True)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for lst in ("up_list", "down_list"):
                for p, q in zip(getattr(module, lst), getattr(bypass, lst)):
                    p.copy_(torch.randn(p.shape, generator=generator))
                    q.copy_(p)
        up = torch.cat([p.detach() for p in module.up_list], dim=1)
        down = torch.cat([p.detach() for p in module.down_list])
        sampled = [k * block_size for k in range(module.block_count)]  # what get_random_rank_weight asks for
        for rank in sampled + [lora_dim]:
            down_b, _, scale = module.get_weight(rank)
            b = down_b.shape[0]
            with torch.no_grad():
                lyc_w = module.get_diff_weight(rank=rank)[0]
            file_w = up[:, :b] @ down[:b] * alpha / b
            k, resid = fit_ratio(lyc_w, file_w)
            rows.append([block_size, rank, "yes" if rank in sampled else "no", b, f"{float(scale):g}",
                         f"{alpha / b:g}", f"{k:.4g}", f"{resid:.0e}"])

        module.apply_to()
        bypass.apply_to()
        torch.manual_seed(2)
        x = torch.randn(4, 64)
        for seed in range(4):
            random.seed(seed)
            k_blocks = random.randint(0, module.block_count - 1)
            b = (k_blocks + 1) * block_size
            random.seed(seed)
            with torch.no_grad():
                ref = base(x) - module.org_forward(x)
            file_out = x @ (up[:, :b] @ down[:b] * alpha / b).T
            random.seed(seed)
            try:
                with torch.no_grad():
                    got = byp_base(x) - bypass.org_forward(x)
                kk, resid = fit_ratio(got, ref)
                verdict = (f"runs; max|bypass - default| {(got - ref).abs().max().item():.2e}, "
                           f"bypass/default {kk:.4g} (resid {resid:.0e}), "
                           f"default/file {fit_ratio(ref, file_out)[0]:.4g}, "
                           f"bypass/file {fit_ratio(got, file_out)[0]:.4g}")
            except Exception as error:  # noqa: BLE001 - the point is to report it
                verdict = f"raises {type(error).__name__}: {str(error).splitlines()[0]}"
            bypass_lines.append(f"   block_size {block_size}, seed {seed} (trains b={b}): {verdict}")
        try:
            with torch.no_grad():
                bypass.bypass_forward_diff(x, 1.0, rank=lora_dim)
            verdict = "runs"
        except Exception as error:  # noqa: BLE001
            verdict = f"raises {type(error).__name__}: {str(error).splitlines()[0]}"
        bypass_lines.append(f"   block_size {block_size}, bypass_forward_diff(x, rank={lora_dim}): {verdict}")

    print(table(["block_size", "rank arg", "sampled in training", "ranks used b", "LyCORIS scale",
                 "file alpha/b", "ratio LyCORIS/file", "resid"], rows))
    print("   bypass_mode=True forward (training mode, random rank seeded identically for both modules):")
    print("\n".join(bypass_lines))


# --------------------------------------------------------------------------------------------------- 4. UNet


def share_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are the original's tensors: the module tree is new
    (peft and LyCORIS can wrap or patch its layers without touching the original), the frozen weights are not
    duplicated (an SD1.5 UNet is 3.4 GB in float32; six copies would not fit next to the other jobs)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def unet_variants(base: nn.Module, targets: str, lyc) -> list[tuple[str, nn.Module, list, int]]:
    """(name, model, trainable parameters, adapted layers) for each variant, all on copies of `base`."""
    from peft import inject_adapter_in_model

    from lorasmith.train.network import adapter_config, freeze_base, lora_layers, lora_parameters

    variants = []
    peft_names = None
    for name, module in [("peft LoRA", "lora"), ("peft LoKr", "lokr"), ("peft LoHa", "loha")]:
        model = inject_adapter_in_model(adapter_config(module, UNET_RANK, UNET_ALPHA, targets), share_copy(base))
        freeze_base(model)
        layers = sorted(lora_layers(model))
        if peft_names is not None and layers != peft_names:
            raise RuntimeError(f"{name} adapted other layers than peft LoRA")
        peft_names = layers
        variants.append((name, model, lora_parameters(model), len(layers)))

    for name, module_class, bypass in [
        ("LyCORIS LoKr", lyc.LokrModule, None),
        ("LyCORIS LoKr bypass", lyc.LokrModule, True),
        ("LyCORIS LoHa bypass", lyc.LohaModule, True),
    ]:
        model = share_copy(base).requires_grad_(False)
        chosen = [(n, m) for n, m in model.named_modules()
                  if re.fullmatch(targets, n) and isinstance(m, (nn.Linear, nn.Conv2d))]
        if sorted(n for n, _ in chosen) != peft_names:
            raise RuntimeError(f"{name}: the regex picks other layers than peft adapted")
        # factor=-1 and decompose_both=False are the defaults of both LyCORIS and peft's LoKrConfig (as
        # adapter_config passes them), so each layer gets the same Kronecker factorisation in both.
        modules = nn.ModuleList(
            module_class("lora_unet_" + n.replace(".", "_"), m, multiplier=1.0, lora_dim=UNET_RANK, alpha=UNET_ALPHA,
                         bypass_mode=bypass)
            for n, m in chosen)
        for module in modules:
            module.apply_to()
        model.lycoris_modules = modules  # registered: alive as long as the model, parameters trainable
        variants.append((name, model, [p for p in modules.parameters() if p.requires_grad], len(chosen)))
    order = ["peft LoRA", "peft LoKr", "LyCORIS LoKr", "LyCORIS LoKr bypass", "peft LoHa", "LyCORIS LoHa bypass"]
    return sorted(variants, key=lambda v: order.index(v[0]))


def unet_step(model: nn.Module, params: list, inputs: tuple, check: str = "") -> float:
    start = time.perf_counter()
    model(*inputs).sample.float().square().mean().backward()
    elapsed = time.perf_counter() - start
    if check and any(p.grad is None for p in params):  # an adapter left out of the graph would run for free
        raise RuntimeError(f"{check}: {sum(p.grad is None for p in params)} trainable tensors got no gradient")
    for p in params:
        p.grad = None
    return elapsed


def unet_bench(lyc, rounds: int, size: str) -> None:
    from diffusers import UNet2DConditionModel

    from lorasmith.train.network import is_adapter, lora_layers, unet_targets
    from lorasmith.models.tiny import SIZES

    config = dict(in_channels=4, out_channels=4, **SIZES[size]["unet"])
    torch.manual_seed(0)
    base = UNet2DConditionModel(**config).requires_grad_(False).train()
    side = 32 if size == "sd15" else config["sample_size"]  # sd15: 256 px latents; tiny: its own 16×16
    torch.manual_seed(3)
    inputs = (torch.randn(1, 4, side, side), torch.tensor([500]),
              torch.randn(1, 77, config["cross_attention_dim"]))
    targets = unet_targets("kohya", conv=False)
    variants = unet_variants(base, targets, lyc)
    convs = sum(isinstance(m, nn.Conv2d) for n, m in base.named_modules() if re.fullmatch(targets, n))

    print(f"4. Whole UNet ({size}, random weights, {sum(p.numel() for p in base.parameters()) / 1e6:.0f} M "
          f"parameters frozen): one training step = forward + backward of output.float().square().mean(), "
          "no optimizer")
    print(f"   latents {tuple(inputs[0].shape)}, context {tuple(inputs[2].shape)}, float32, "
          f"{torch.get_num_threads()} CPU threads, rank {UNET_RANK}, alpha {UNET_ALPHA:g}, Kohya's linear set "
          f"(unet_targets('kohya', conv=False): {variants[0][3]} layers, of which {convs} 1×1 Conv2d), "
          f"median of {rounds} interleaved rounds after 1 warm-up")
    times = {name: [] for name, *_ in variants}
    for name, model, params, _ in variants:
        unet_step(model, params, inputs, check=name)
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for name, model, params, _ in order:
            times[name].append(unet_step(model, params, inputs))
    ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
    counts = {name: sum(p.numel() for p in params) for name, _, params, _ in variants}
    rows = [[name, f"{counts[name]:,}", f"{ms[name]:.0f}", f"{ms[name] / ms['peft LoRA']:.2f}"]
            for name, *_ in variants]
    print(table(["variant", "trainable params", "ms/step", "x peft LoRA"], rows))
    models = {name: model for name, model, *_ in variants}
    for algo in ("LoKr", "LoHa"):
        peft_shapes = {"lora_unet_" + n.replace(".", "_"): {k.split(".")[0]: tuple(p.shape)
                                                             for k, p in layer.named_parameters() if is_adapter(k)}
                       for n, layer in lora_layers(models[f"peft {algo}"]).items()}
        for name in (n for n in counts if n.startswith(f"LyCORIS {algo}")):
            lyc_shapes = {m.lora_name: {k: tuple(p.shape) for k, p in m.named_parameters()}
                          for m in models[name].lycoris_modules}
            differ = [n for n in peft_shapes if peft_shapes[n] != lyc_shapes.get(n)]
            same = "same" if counts[name] == counts[f"peft {algo}"] else "DIFFERENT"
            layers = (f"same tensors and shapes on all {len(peft_shapes)} layers" if not differ else
                      f"{len(differ)} layers differ, e.g. {differ[0]}: peft {peft_shapes[differ[0]]}, "
                      f"LyCORIS {lyc_shapes.get(differ[0])}")
            print(f"   {name} vs peft {algo}: {same} trainable parameter count, {layers}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median)")
    parser.add_argument("--batch", type=int, default=2, help="batch of the speed inputs (SD1.5 training: 2)")
    parser.add_argument("--unet", action="store_true",
                        help="run section 4 alone: one training step of a whole UNet, peft vs LyCORIS")
    parser.add_argument("--unet-size", choices=["sd15", "tiny"], default="sd15",
                        help="UNet of --unet: SD1.5's architecture (random weights) or a tiny one for smoke runs")
    args = parser.parse_args()
    try:
        from lycoris.modules import dylora as lyc_dylora
        from lycoris.modules import loha as lyc_loha
        from lycoris.modules import lokr as lyc_lokr
    except Exception:  # noqa: BLE001 - any failure to import means no comparison
        print("this comparison needs LyCORIS: pip install lycoris-lora")
        sys.exit(2)

    class lyc:  # noqa: N801 - a namespace
        LohaModule = lyc_loha.LohaModule
        LokrModule = lyc_lokr.LokrModule
        DyLoraModule = lyc_dylora.DyLoraModule

    import importlib.metadata

    import peft

    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, peft {peft.__version__}, "
          f"lycoris-lora {importlib.metadata.version('lycoris-lora')}")
    print()
    if args.unet:
        unet_bench(lyc, args.rounds, args.unet_size)
        return
    agreement(lyc)
    speed(lyc, args.rounds, args.batch)
    dylora(lyc)


if __name__ == "__main__":
    main()
