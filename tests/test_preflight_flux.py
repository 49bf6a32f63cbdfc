"""--preflight on Flux.1: the public FLUX.1-dev architecture against its published parameter counts, the meta step
of a tiny Flux against the same step on real tensors and against the trainer's own steps, depth extrapolation
over the double and single blocks, BFL transformer files, the command's lines and its refusals."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch

from conftest import small_dataset, write_preset
from lorasmith.train.architectures import resolve_arch
from lorasmith.train.footprint import StepSetup, by_depth, simulate_step
from lorasmith.train.schema import NetworkConfig

FLUX_DEV_TRANSFORMER = 11_901_408_320
"""FLUX.1-dev's transformer parameters: "a 12 billion parameter rectified flow transformer" (BFL's model card);
the exact count is the sum of flux1-dev.safetensors' tensor sizes."""
T5_XXL_ENCODER = 4_762_310_656
"""google/t5-v1_1-xxl's encoder (FLUX.1-dev's text_encoder_2/model-*.safetensors: 9.52 GB in bf16)."""
CLIP_L_TEXT = 123_060_480
"""openai/clip-vit-large-patch14's text model (FLUX.1-dev's text_encoder: 246 MB in bf16)."""


@pytest.fixture(scope="module")
def flux_preset(tmp_path_factory, tiny_flux):
    root = tmp_path_factory.mktemp("flux-preflight")
    data = small_dataset(root / "data", images=4, repeats=2, size=(96, 64))
    return write_preset(root / "p.toml", tiny_flux, data, root / "out",
                        dataset={"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128,
                                 "t5xxl_max_token_length": 32},
                        network={"network_dim": 4, "network_alpha": 2},
                        optimizer={"optimizer_type": "AdamW", "text_encoder_lr": 1e-4},
                        training={"max_train_steps": 4, "train_batch_size": 2})


def setup(text="cached", checkpointing=False, tokens=32):
    return StepSetup((64, 64), 2, torch.float32, None, checkpointing, text, NetworkConfig(network_dim=4, network_alpha=2),
                     max_tokens=tokens)


def test_the_public_flux_dev_holds_its_published_parameter_counts(flux_preset):
    """bf16 weights are two bytes a parameter: the transformer's 11.9 B while training, T5-XXL and CLIP-L while
    captions are cached (before the transformer loads)."""
    from lorasmith.train.config import load_config
    from lorasmith.train.preflight import FLOW_EFFICIENCY, GIB, estimate
    from lorasmith.train.preparation import plan_run

    config = load_config(flux_preset)
    config.training.mixed_precision, config.optimizer.text_encoder_lr = "bf16", 0.0
    arch = resolve_arch("black-forest-labs/FLUX.1-dev")
    est = estimate(config, arch, plan_run(config))
    assert arch.family == "flux" and arch.unet["guidance_embeds"]
    assert est.parts["weights"] == 2 * FLUX_DEV_TRANSFORMER
    texts = 2 * (T5_XXL_ENCODER + CLIP_L_TEXT) + 77 * 8  # and CLIP's int64 position ids
    encoding = est.before["caching captions"] - est.parts["text cache"]
    assert texts < encoding < texts * 1.05
    captions = 1 + len({item.caption for item in plan_run(config)[0].items})  # and the empty caption
    assert est.parts["text cache"] == captions * (32 * 4096 + 768) * 2  # T5's 32 tokens × 4096, CLIP's pooled 768
    assert est.efficiency == FLOW_EFFICIENCY and est.training > 22 * GIB  # bf16 Flux does not fit 24 GB
    fp8 = estimate(replace_key(config, "model", base_precision="fp8"), arch, plan_run(config))
    assert fp8.parts["weights"] < 0.51 * est.parts["weights"]


def replace_key(config, section: str, **values):
    import copy

    changed = copy.deepcopy(config)
    for key, value in values.items():
        setattr(getattr(changed, section), key, value)
    return changed


@pytest.mark.parametrize("text, checkpointing", [("trained", True), ("cached", False)])
def test_the_meta_step_holds_what_the_real_step_holds(tiny_flux, text, checkpointing):
    """The same Flux step on real CPU tensors, counted live: the same bytes held and FLOPs, the peak within 5 %."""
    arch = resolve_arch(str(tiny_flux))
    torch.manual_seed(0)
    real = simulate_step(arch, setup(text, checkpointing), device="cpu", real_autocast=True)
    fake = simulate_step(arch, setup(text, checkpointing))
    assert fake.resident == real.resident and fake.flops == real.flops
    assert fake.peak == pytest.approx(real.peak, rel=0.05)


def test_depth_extrapolation_over_double_and_single_blocks_is_exact(tiny_flux):
    arch = resolve_arch(str(tiny_flux))
    deep = replace(arch, unet={**arch.unet, "num_layers": 4, "num_single_layers": 3})
    full, extrapolated = simulate_step(deep, setup()), by_depth(deep, lambda a: simulate_step(a, setup()))
    for key in ("resident", "frozen", "adapters", "peak", "grads", "flops", "ops"):
        assert getattr(extrapolated, key) == getattr(full, key), key
    assert sorted(extrapolated.trainable) == sorted(full.trainable)


def test_a_bfl_transformer_file_is_read_off_its_shapes(tiny_flux, tmp_path):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from lorasmith.models.flux_file import bfl_state_dict

    model = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    save_file(bfl_state_dict(model), tmp_path / "flux1-tiny.safetensors")
    arch = resolve_arch(str(tmp_path / "flux1-tiny.safetensors"))
    assert arch.family == "flux" and "flux1-tiny.safetensors" in arch.source
    for key in ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads", "guidance_embeds"):
        assert arch.unet[key] == model.config[key], key
    assert arch.texts[1].d_model == 4096  # the public T5-XXL beside it


def test_measured_steps_through_the_trainer_agree_with_the_estimate(flux_preset, tiny_flux, tmp_path):
    """--measure's path on CPU: the trainer's own Flux steps (CLIP-L trained, T5 frozen beside it) peak within
    15 % of the estimate of the same training-only preset."""
    from lorasmith.train.config import load_config
    from lorasmith.train.preflight import estimate
    from lorasmith.train.preflight_measure import measure_steps, training_only
    from lorasmith.train.preparation import plan_run

    config = training_only(load_config(flux_preset), str(tmp_path / "out"))
    dataset, plan = plan_run(config)
    measured = measure_steps(config, dataset, plan, steps=2, log=lambda m: None)
    est = estimate(config, resolve_arch(str(tiny_flux)), (dataset, plan))
    assert math.isclose(est.training, measured["peak"], rel_tol=0.15), (est.training, measured["peak"])


def test_the_command_estimates_flux_and_refuses_what_flux_cannot_train(flux_preset, capsys):
    from lorasmith.train.cli import main

    assert main([str(flux_preset), "--preflight", "--family", "flux", "--gpu", "H100", "--set", "model.base_precision=fp8",
                 "--set", "training.mixed_precision=bf16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("preflight: Flux.1 from the public FLUX.1-dev architecture")
    assert "before the transformer loads" in out
    # without checkpointing autograd keeps each fp8 layer's upcast bf16 weight until backward: 2 bytes a
    # transformer parameter on top of the fp8 weights, which checkpointing gives back
    activations = float(re.search(r"activations ([0-9.]+)", out).group(1))
    assert activations > 2 * FLUX_DEV_TRANSFORMER / 2**30
    assert re.search(r"^H100 SXM     80 GB  fits \(4[0-9.]+ of 75.2 GiB\)", out, re.M)
    assert main([str(flux_preset), "--preflight", "--set", 'network.network_module="loha"']) == 2
    err = capsys.readouterr().err.strip()
    assert "network.network_module" in err and len(err.splitlines()) == 1


def test_each_flux_preset_fits_the_card_its_name_promises(tmp_path):
    """flux-dev-*-16gb.toml on a 16 GB card, the others on a 24 GB one, estimated on the public FLUX.1-dev."""
    from pathlib import Path

    from lorasmith.train.config import load_config
    from lorasmith.train.gpus import find_card
    from lorasmith.train.preflight import estimate
    from lorasmith.train.preparation import plan_run

    data = small_dataset(tmp_path / "data", images=2, repeats=1, size=(1024, 1024))
    presets = sorted((Path(__file__).parents[1] / "presets").glob("flux-dev-*.toml"))
    assert len(presets) == 4
    for path in presets:
        config = load_config(path, [f"dataset.train_data_dir={data}", f"output.output_dir={tmp_path / 'out'}"])
        est = estimate(config, resolve_arch(config.model.pretrained_model), plan_run(config))
        card = find_card("T4" if "16gb" in path.name else "4090")
        assert est.fits(card), (path.name, est.on_card / 2**30)
