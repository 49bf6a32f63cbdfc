"""--preflight: the meta-device step against independent counts and real tensors, FLOPs against hand counts,
the card table, the fixes for a preset that does not fit, and the command's lines and refusals."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import small_dataset, write_preset
from lorasmith.train.cli import main
from lorasmith.train.config import load_config
from lorasmith.train.architectures import PreflightError, public_arch, resolve_arch
from lorasmith.train.footprint import StepSetup, by_depth, estimate_step, simulate_step
from lorasmith.train.gpus import CARDS, Card, CardError, find_card
from lorasmith.train.meta_device import Autocast, LiveBytes, meta_build
from lorasmith.train.preflight import GIB, estimate, optimizer_bytes, sample_events
from lorasmith.train.preflight_report import CHANGES, card_line, fixes
from lorasmith.train.preparation import plan_run
from lorasmith.train.schema import NetworkConfig


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory, tiny_sd):
    root = tmp_path_factory.mktemp("preflight")
    return write_preset(root / "p.toml", tiny_sd, small_dataset(root / "data"), root / "out",
                        network={"network_dim": 4, "network_alpha": 2},
                        optimizer={"optimizer_type": "AdamW", "text_encoder_lr": 1e-4},
                        training={"max_train_steps": 6, "train_batch_size": 2})


def tiny_setup(text="cached", checkpointing=False, dim=4, batch=2):
    return StepSetup((128, 128), batch, torch.float32, None, checkpointing, text,
                     NetworkConfig(network_dim=dim, network_alpha=dim / 2))


def test_held_bytes_match_an_independent_count_of_a_real_model(tiny_sd):
    from diffusers import UNet2DConditionModel

    from lorasmith.train.network import add_unet_lora, freeze_base, lora_parameters

    arch = resolve_arch(str(tiny_sd))
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    add_unet_lora(unet, 4, 2)
    freeze_base(unet)
    adapters = lora_parameters(unet)
    base = [p for p in unet.parameters() if not p.requires_grad]
    cost = estimate_step(arch, tiny_setup())
    assert cost.adapters == 4 * sum(p.numel() for p in adapters)
    assert cost.frozen == 4 * sum(p.numel() for p in base) + sum(b.numel() * b.element_size() for b in unet.buffers())
    assert sorted(cost.trainable) == sorted(tuple(p.shape) for p in adapters)
    assert cost.grads == cost.adapters  # every adapter receives an fp32 gradient


@pytest.mark.parametrize("kind", ["AdamW", "AdamW8bit"])
def test_optimizer_state_matches_a_real_optimizer(kind):
    """Tensors on both sides of bitsandbytes' 4,096-element threshold; the state a real step creates, counted
    by unique storage."""
    from lorasmith.train.optim import build_optimizer

    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(16, 100), (4096,), (64, 320), (8, 8)]]
    optimizer = build_optimizer(kind, [{"params": params, "lr": 1e-3}], 0.01)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for state in optimizer.state.values() for t in state.values()
                if torch.is_tensor(t) and t.numel() > 1}
    qmaps = 2 * 256 * 4 if kind == "AdamW8bit" else 0  # bitsandbytes' two quantisation maps, shared by all tensors
    assert optimizer_bytes(kind, [tuple(p.shape) for p in params])[0] == sum(storages.values()) - qmaps


def test_adafactor_and_the_others_by_hand():
    shapes = [(8, 320), (320,)]
    assert optimizer_bytes("Adafactor", shapes)[0] == 4 * (8 + 320) + 4 * 320
    assert optimizer_bytes("Lion", shapes)[0] == 4 * (8 * 320 + 320)
    assert optimizer_bytes("Prodigy", shapes)[0] == 16 * (8 * 320 + 320)
    with pytest.raises(PreflightError):
        optimizer_bytes("SGD", shapes)


def test_the_meta_step_holds_what_the_real_step_holds(tiny_sd):
    """The same step (text encoder trained, gradient checkpointing) on real CPU tensors, counted live: the meta
    estimate agrees within 5 % (bench/preflight_bench.py does the same at full size, and against RSS)."""
    arch, setup = resolve_arch(str(tiny_sd)), tiny_setup("trained", True)
    torch.manual_seed(0)
    real = simulate_step(arch, setup, device="cpu", real_autocast=True)
    fake = simulate_step(arch, setup)
    assert fake.resident == real.resident and fake.flops == real.flops
    assert fake.peak == pytest.approx(real.peak, rel=0.05)


def test_depth_extrapolation_is_exact(tiny_sd):
    arch = resolve_arch(str(tiny_sd))
    deep = type(arch)(arch.family, {**arch.unet, "transformer_layers_per_block": 3}, arch.texts, arch.vae, "deep")
    setup = tiny_setup()
    full, extrapolated = simulate_step(deep, setup), by_depth(deep, lambda a: simulate_step(a, setup))
    for key in ("resident", "frozen", "adapters", "peak", "grads", "flops", "ops"):
        assert getattr(extrapolated, key) == getattr(full, key), key
    assert sorted(extrapolated.trainable) == sorted(full.trainable)


def test_flops_of_linear_conv_and_attention_match_hand_counts():
    linear = meta_build(lambda: torch.nn.Linear(64, 32))
    conv = meta_build(lambda: torch.nn.Conv2d(8, 16, 3, padding=1))
    with LiveBytes() as live:
        linear(torch.randn(8, 64, device="meta"))
    assert live.flops == 2 * 8 * 64 * 32
    with LiveBytes() as live:
        conv(torch.randn(2, 8, 10, 10, device="meta"))
    assert live.flops == 2 * 2 * 10 * 10 * 16 * 8 * 3 * 3
    q = k = v = torch.randn(1, 2, 16, 8, device="meta")
    with LiveBytes() as live, Autocast():
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert live.flops == 2 * (2 * 16 * 16 * 8) * 2  # q·kᵀ and weights·v, 2 FLOPs per multiply-add


def test_the_emulated_autocast_follows_cuda_and_cpu_lists():
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16, device="meta")
    with Autocast(torch.bfloat16, "cuda"):
        assert torch.nn.functional.group_norm(x, 4).dtype == torch.float32
        assert torch.nn.functional.linear(x.float(), torch.randn(3, 4, device="meta")).dtype == torch.bfloat16
    with Autocast(torch.bfloat16, "cpu"):
        assert torch.nn.functional.group_norm(x, 4).dtype == torch.bfloat16


@pytest.mark.parametrize("name, card", [("4090", "RTX 4090"), ("rtx-4090", "RTX 4090"), ("H100", "H100 SXM"),
                                        ("h200", "H200"), ("A100", "A100-80GB"), ("a100-40gb", "A100-40GB"),
                                        ("T4", "T4"), ("l40s", "L40S"), ("5090", "RTX 5090"), ("A10G", "A10")])
def test_card_names(name, card):
    assert find_card(name).name == card


@pytest.mark.parametrize("name", ["9090", "", "rtx"])
def test_unknown_card_names_are_refused(name):
    with pytest.raises(CardError):
        find_card(name)


def test_card_table():
    assert len(CARDS) == 11 and all(c.fp16_tflops > c.fp32_tflops > 0 for c in CARDS)
    t4 = find_card("t4")
    assert t4.bf16_tflops is None and t4.peak("bf16") == t4.fp32_tflops and t4.peak("fp16") == 65.0
    assert find_card("h100").peak("bf16") == 989.5  # half the data sheet's sparse 1,979


def test_fixes_are_ranked_and_each_needs_less(tiny_preset, tiny_sd):
    config = load_config(tiny_preset, ["training.train_batch_size=8"])
    arch, planned = resolve_arch(str(tiny_sd)), plan_run(config)
    est = estimate(config, arch, planned)
    found = fixes(config, arch, planned, est, plan_run)
    order = [c[0] for c in CHANGES]
    positions = [next(i for i, c in enumerate(order) if f.change.startswith(c)) for f in found]
    assert positions == sorted(positions) and len(found) >= 4  # cheapest first: checkpointing, batch 1, ...
    sizes = [est.allocated] + [f.estimate.allocated for f in found]
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    small = Card("tiny", (found[-1].estimate.on_card + est.on_card) / 2 / 0.94 / GIB, 10.0, 10.0, (), 1.0)
    line = card_line(est, small, None, found)
    assert "does not fit" in line and "fits with" in line


def test_public_architectures_and_hub_ids():
    assert resolve_arch("stabilityai/stable-diffusion-xl-base-1.0").family == "sdxl"
    assert public_arch("sd2").texts[0].hidden_size == 1024
    with pytest.raises(PreflightError, match="--family"):
        resolve_arch("someone/unknown-model")
    assert resolve_arch("someone/unknown-model", "sd1").family == "sd1"


def test_sample_events():
    from types import SimpleNamespace

    plan = SimpleNamespace(epochs=10, total_steps=100)
    sample = SimpleNamespace(sample_at_first=True, sample_every_n_epochs=2, sample_every_n_steps=0)
    assert sample_events(sample, plan) == 6
    sample.sample_every_n_epochs = 3
    assert sample_events(sample, plan) == 1 + 3 + 1  # and once more at the end


def test_the_command_prints_one_line_per_card(tiny_preset, capsys):
    assert main([str(tiny_preset), "--preflight", "--price-per-hour", "0.5"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if any(line.startswith(c.name + " ") for c in CARDS)]
    assert len(lines) == len(CARDS) and all("fits" in line and "$" in line for line in lines)


def test_one_card_in_detail(tiny_preset, capsys):
    assert main([str(tiny_preset), "--preflight", "--gpu", "4090"]) == 0
    out = capsys.readouterr().out
    assert "RTX 4090" in out and "optimizer state" in out and "activations" in out


@pytest.mark.parametrize("args, message", [
    (["--preflight", "--gpu", "9090"], "9090 is not a card"),
    (["--gpu", "4090"], "apply to --preflight only"),
    (["--preflight", "--price-per-hour", "-1"], "positive"),
])
def test_refusals_are_one_sentence_and_exit_2(tiny_preset, capsys, args, message):
    assert main([str(tiny_preset), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_measure_without_cuda_says_so(tiny_preset, capsys):
    assert main([str(tiny_preset), "--preflight", "--measure"]) == 2
    err = capsys.readouterr().err.strip()
    assert "CUDA" in err and len(err.splitlines()) == 1


def test_measured_steps_through_the_trainer_agree_with_the_estimate(tiny_preset, tiny_sd, tmp_path):
    """The --measure path on CPU (the peak counted live instead of by CUDA): the estimate of the same
    training-only preset is within 15 % of the trainer's own steps."""
    from lorasmith.train.preflight_measure import measure_steps, training_only

    config = training_only(load_config(tiny_preset), str(tmp_path / "out"))
    dataset, plan = plan_run(config)
    measured = measure_steps(config, dataset, plan, steps=2, log=lambda m: None)
    est = estimate(config, resolve_arch(str(tiny_sd)), (dataset, plan))
    assert math.isclose(est.training, measured["peak"], rel_tol=0.15), (est.training, measured["peak"])
