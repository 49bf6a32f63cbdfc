"""How far `train-lora --preflight`'s estimate is from reality, on this CPU.

Default (--check): one training step of a random-weight model with the exact SD1.5 architecture at 256 px,
batch 1, LoRA rank 16, text outputs cached, in fp32 without and with gradient checkpointing and in bf16
(torch.autocast on CPU). Each runs twice in a fresh process: the estimate (the step on the meta device,
train/footprint.py), and the real step on real CPU tensors, measured two ways: live tensor storages counted by
the same dispatch mode, and the process's peak RSS (VmHWM, reset just before the step; large allocations are
forced to mmap so a freed tensor leaves RSS at once). Printed: the step's peak above the weights (activations
and gradients) and the whole peak (weights included), estimate against each measurement.

    .venv/bin/python bench/preflight_bench.py [--check] [--size 256]
    .venv/bin/python bench/preflight_bench.py --depth        # by_depth's extrapolation against a full SDXL step
    .venv/bin/python bench/preflight_bench.py --calibrate    # EFFICIENCY and STEP_OVERHEAD from published speeds
    .venv/bin/python bench/preflight_bench.py --table        # the README's presets × cards table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
CASES = {"fp32": ("float32", False), "fp32+checkpointing": ("float32", True), "bf16": ("bfloat16", False)}


def setup(dtype_name: str, checkpointing: bool, size: int, rank: int = 16):
    import torch

    from lorasmith.train.footprint import StepSetup
    from lorasmith.train.schema import NetworkConfig

    dtype = getattr(torch, dtype_name)
    return StepSetup((size, size), 1, dtype, None if dtype is torch.float32 else dtype, checkpointing, "cached",
                     NetworkConfig(network_dim=rank, network_alpha=rank / 2), 1, 5.0, autocast_device="cpu")


def _proc(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(case: str, size: int, real: bool) -> dict:
    """One case in this process: the estimate, or the real step with both measurements."""
    from lorasmith.train.footprint import estimate_step, simulate_step
    from lorasmith.train.architectures import public_arch

    arch = public_arch("sd1")
    if case == "VAE encode":
        return _vae_child(arch, size, real)
    step = setup(*CASES[case], size)
    if not real:
        cost = estimate_step(arch, step)
        return {"resident": cost.resident, "peak": cost.peak, "flops": cost.flops}
    import gc

    import torch

    torch.manual_seed(0)
    rss = {}

    def before_step():  # called by simulate_step once the model, adapters and inputs exist: reset VmHWM here
        gc.collect()
        rss["before"] = _proc("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")

    cost = simulate_step(arch, step, device="cpu", real_autocast=True, before_step=before_step)
    return {"resident": cost.resident, "peak": cost.peak, "rss_peak": _proc("VmHWM") - rss["before"],
            "rss_before": rss["before"]}


def _vae_child(arch, size: int, real: bool) -> dict:
    """Latent caching as the trainer does it: the VAE encoding 4 pictures at a time, fp32, in inference mode."""
    import gc

    import torch

    from lorasmith.train.footprint import build_vae, cast_base, simulate_vae
    from lorasmith.train.meta_device import LiveBytes

    if not real:
        cost = simulate_vae(arch, (size, size), 4, torch.float32, False)
        return {"resident": cost.resident, "peak": cost.peak}
    vae = build_vae(arch, "cpu")
    cast_base(vae, torch.float32)
    pixels = torch.randn(4, 3, size, size)
    live = LiveBytes()
    live.track(*vae.parameters(), *vae.buffers(), pixels)
    resident = live.now
    gc.collect()
    before = _proc("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    with live, torch.inference_mode():
        vae.encode(pixels).latent_dist.mode()
    return {"resident": resident, "peak": live.peak - resident, "rss_peak": _proc("VmHWM") - before}


def run_case(case: str, size: int, real: bool) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, __file__, "--child", case, "--size", str(size)] + (["--real"] if real else []),
                         capture_output=True, text=True, env=env, cwd=REPO, check=False)
    if out.returncode:
        raise SystemExit(f"{case} failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(size: int) -> None:
    print(f"SD1.5 architecture, {size}×{size}, batch 1, LoRA rank 16, text outputs cached (VAE encode: 4 pictures, "
          "fp32, as latent caching runs); GiB")
    print(f"{'case':<20} {'step est.':>9} {'step live':>9} {'step RSS':>9} {'total est.':>10} {'total live':>10} "
          f"{'total RSS':>9}  est./live  est./RSS")
    for case in [*CASES, "VAE encode"]:
        est, real = run_case(case, size, False), run_case(case, size, True)
        total_est, total_live = est["resident"] + est["peak"], real["resident"] + real["peak"]
        total_rss = real["resident"] + real["rss_peak"]
        print(f"{case:<20} {est['peak'] / GIB:9.3f} {real['peak'] / GIB:9.3f} {real['rss_peak'] / GIB:9.3f} "
              f"{total_est / GIB:10.3f} {total_live / GIB:10.3f} {total_rss / GIB:9.3f}  "
              f"step {est['peak'] / real['peak'] - 1:+.1%}, total {total_est / total_live - 1:+.1%}; "
              f"step {est['peak'] / real['rss_peak'] - 1:+.1%}, total {total_est / total_rss - 1:+.1%}")


def depth() -> None:
    """by_depth's extrapolation (1 and 2 blocks) against the full SDXL step with 10, at 1024², bf16."""
    import time

    import torch

    from lorasmith.train.footprint import estimate_step, simulate_step
    from lorasmith.train.architectures import public_arch

    arch, step = public_arch("sdxl"), setup("bfloat16", True, 1024, 32)
    step.autocast_device = "cuda"
    step.amp = torch.bfloat16
    for name, function in (("extrapolated", estimate_step), ("full", simulate_step)):
        started = time.perf_counter()
        cost = function(arch, step)
        print(f"{name:<13} resident {cost.resident / GIB:.4f} GiB, step peak {cost.peak / GIB:.4f} GiB, gradients "
              f"{cost.grads / GIB:.4f} GiB, {cost.flops / 1e12:.4f} TFLOP, {cost.ops} ops, "
              f"{len(cost.trainable)} trainable tensors ({time.perf_counter() - started:.1f} s)")


PUBLISHED = [
    # (card, seconds per step, where, preset changes): the two the fit uses, then one it does not
    ("RTX 4090", 1.15, "bmaltais/kohya_ss#1288: SDXL LoRA 1024², batch 1, bf16, cached latents, 1.13-1.21 s/it",
     dict(family="sdxl", size=1024, precision="bf16", checkpointing=True, text="cached", rank=32)),
    ("RTX 3090", 1 / 1.7, "SD1.5 LoRA 512², batch 1, fp16, text encoder trained: ~1.7 it/s (user reports)",
     dict(family="sd1", size=512, precision="fp16", checkpointing=False, text="trained", rank=32)),
    ("RTX 3090 Ti", 1.12, "kohya-ss/sd-scripts#827: SDXL LoRA 1024², batch 1, bf16, no gradient checkpointing, "
     "text encoders trained, rank 32: 1.12 s/it", dict(family="sdxl", size=1024, precision="bf16",
                                                        checkpointing=False, text="trained", rank=32)),
]
FLOW_PUBLISHED = ("RTX 4090", 4.25, "bghira/SimpleTuner#1184: Flux.1-dev LoRA 1024², batch 1, fp8 base, gradient "
                  "checkpointing, rank 1: 4.25 s/step", dict(family="flux", size=1024, precision="bf16",
                                                             checkpointing=True, text="cached", rank=1))
"""Flux's transformer has its own efficiency (FLOW_EFFICIENCY), fitted to this one speed with the UNets' overhead."""
EXTRA_CARDS = {"RTX 3090 Ti": 80.0}
"""Dense fp16 tensor TFLOPS (fp32 accumulate) of cards outside gpus.CARDS: the 3090 Ti's GA102 at 40 FP32
TFLOPS, with tensor rates at twice that as on the 3090 (35.6 → 71)."""


def _flops(case: dict) -> int:
    import torch

    from lorasmith.train.footprint import StepSetup, estimate_step
    from lorasmith.train.architectures import public_arch
    from lorasmith.train.schema import NetworkConfig

    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[case["precision"]])
    flow = case["family"] == "flux"
    step = StepSetup((case["size"],) * 2, 1, dtype, dtype, case["checkpointing"], case["text"],
                     NetworkConfig(network_dim=case["rank"], network_alpha=case["rank"] / 2), 1,
                     0.0 if flow else 5.0, fp8_base=flow, max_tokens=512 if flow else 75)
    return estimate_step(public_arch(case["family"]), step).flops


def calibrate() -> None:
    """EFFICIENCY and STEP_OVERHEAD solved from the first two published speeds; every speed predicted back."""
    from lorasmith.train.gpus import CARDS
    from lorasmith.train.preflight import EFFICIENCY, FLOW_EFFICIENCY, STEP_OVERHEAD

    peaks = {**{c.name: c.fp16_tflops for c in CARDS}, **EXTRA_CARDS}
    work = [(name, seconds, where, _flops(case) / (peaks[name] * 1e12)) for name, seconds, where, case in PUBLISHED]
    (_, t_a, _, w_a), (_, t_b, _, w_b) = work[:2]
    efficiency = (w_a - w_b) / (t_a - t_b)
    overhead = t_a - w_a / efficiency
    print(f"fit: EFFICIENCY {efficiency:.3f}, STEP_OVERHEAD {overhead:.3f} s (in preflight.py: {EFFICIENCY}, "
          f"{STEP_OVERHEAD})")
    for name, seconds, where, ideal in work:
        predicted = ideal / EFFICIENCY + STEP_OVERHEAD
        print(f"{name:<12} published {seconds:.3f} s/step, estimated {predicted:.3f} ({predicted / seconds - 1:+.0%})"
              f"  [{where}]")
    name, seconds, where, case = FLOW_PUBLISHED
    ideal = _flops(case) / (peaks[name] * 1e12)
    print(f"Flux fit: FLOW_EFFICIENCY {ideal / (seconds - overhead):.3f} (in preflight.py: {FLOW_EFFICIENCY}); "
          f"{name} published {seconds:.2f} s/step, estimated {ideal / FLOW_EFFICIENCY + STEP_OVERHEAD:.2f}  [{where}]")
    memory()


def memory() -> None:
    """kohya-ss/sd-scripts README, "Tips for SDXL training": LoRA training "can be done with 8GB GPU memory (10GB
    recommended)" training the U-Net only, with gradient checkpointing, cached text encoder outputs and latents,
    an 8-bit optimizer and a low rank (4 to 8)."""
    from lorasmith.train.architectures import public_arch
    from lorasmith.train.config import load_config
    from lorasmith.train.preflight import ALLOCATOR_SLACK, CUDA_CONTEXT, estimate

    config = load_config(REPO / "presets/sdxl-style.toml", ["network.network_dim=8", "network.network_alpha=4"])
    est = estimate(config, public_arch("sdxl"))
    training = est.training * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in {**est.parts, **est.breakdown}.items())
    print(f"SDXL LoRA rank 8, 1024², batch 1, bf16, checkpointing, cached text outputs, AdamW8bit (sd-scripts: "
          f"8 GB, 10 GB recommended): training {est.training / GIB:.2f} GiB allocated ({parts}), "
          f"{training / GIB:.2f} GiB on the card; caching latents 4 at a time "
          f"{est.before['caching latents'] / GIB:.2f} GiB allocated")


def table() -> None:
    """The README table: each shipped SD1.5, SDXL and Flux preset on each card, as --preflight estimates it."""
    from lorasmith.train.config import load_config
    from lorasmith.train.gpus import CARDS
    from lorasmith.train.architectures import public_arch, resolve_arch
    from lorasmith.train.preflight import estimate
    from lorasmith.train.preparation import plan_run

    print("| preset | peak on the card | " + " | ".join(c.name for c in CARDS) + " |")
    print("|---|---|" + "---|" * len(CARDS))
    for preset in sorted(p for family in ("sd15", "sdxl", "flux") for p in REPO.glob(f"presets/{family}-*.toml")):
        config = load_config(preset)
        arch = resolve_arch(config.model.pretrained_model)
        est = estimate(config, arch, plan_run(config))
        cells = [f"{est.hours(c):.1f} h" if est.fits(c) else "no" for c in CARDS]
        print(f"| {preset.name} | {est.on_card / GIB:.1f} GiB | " + " | ".join(cells) + " |")
    print(f"\n(public architectures: {public_arch('sd1').source}; steps from each preset's plan on its dataset)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--depth", action="store_true")
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--real", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.size, args.real)))
    elif args.depth:
        depth()
    elif args.calibrate:
        calibrate()
    elif args.table:
        table()
    else:
        check(args.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
