"""Network types (LoRA, LoCon, LoHa, LoKr, DyLoRA): the file each writes, read back with the algorithm's
published formula, is the model that trained; a DyLoRA cut to fewer ranks is the model at those ranks; LoHa
resumes bit-identically after SIGKILL."""

import json
import os
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import small_dataset, write_preset
from lorasmith.lorafile.read import read_lora
from test_train_resume import finish, same_lora, train, wait_for_step


def delta(tensors: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """ΔW of one module from its file tensors, as A1111's and ComfyUI's loaders compute it."""
    t, alpha = tensors, float(tensors["alpha"])
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * alpha / down.shape[0]
    if "hada_w1_a" in t:  # LoHa: (w1a·w1b) ⊙ (w2a·w2b) · alpha / r
        w = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return w.reshape(shape) * alpha / t["hada_w1_b"].shape[0]
    # LoKr: kron(w1, w2) · alpha / r, where r is a decomposed factor's rank; no scale when both are full
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    if len(shape) == 4:
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:]) if w2.dim() == 2 else w2
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape) * (alpha / rank if rank else 1.0)


def modules_of(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict] = {}
    for key, tensor in tensors.items():
        name, suffix = key.split(".", 1)
        modules.setdefault(name, {})[suffix] = tensor
    return modules


def kohya_layers(unet) -> dict:
    return {"lora_unet_" + name.replace(".", "_"): m for name, m in unet.named_modules()}


def add_to_base(base, modules: dict[str, dict]) -> float:
    """Every module's ΔW added to the base UNet's weights; the largest change."""
    layers, largest = kohya_layers(base), 0.0
    with torch.no_grad():
        for name, parts in modules.items():
            change = delta(parts, layers[name].weight.shape)
            layers[name].weight += change
            largest = max(largest, float(change.abs().max()))
    return largest


def unet_output(unet) -> torch.Tensor:
    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return unet.eval()(sample, 500, context).sample


@pytest.mark.parametrize("module", ["lora", "locon", "loha", "lokr", "dylora"])
def test_the_file_rebuilt_by_the_published_formula_is_the_live_model(module, tiny_sd, tmp_path):
    from lorasmith.train.config import load_config
    from lorasmith.models.base import load_components
    from lorasmith.train.trainer import run

    network = {"network_module": module, "network_dim": 4, "network_alpha": 2}
    if module != "locon":
        network.update(conv_dim=2, conv_alpha=1)
    preset = write_preset(tmp_path / "p.toml", tiny_sd, small_dataset(tmp_path / "data", images=2), tmp_path / "out",
                          network=network, optimizer={"learning_rate": 2e-2},
                          training={"max_train_steps": 3, "train_batch_size": 2})
    result, _ = run(load_config(preset), progress=False, log=lambda message: None)
    file = tmp_path / "out" / "test.safetensors"
    tensors = load_file(str(file))
    with safe_open(str(file), "pt") as handle:
        meta = handle.metadata()
    expected_module = {"loha": "lycoris.kohya", "lokr": "lycoris.kohya", "dylora": "networks.dylora"}.get(
        module, "networks.lora")
    assert meta["ss_network_module"] == expected_module
    args = json.loads(meta["ss_network_args"])
    assert args.get("algo") == (module if module in ("loha", "lokr") else None)
    assert args["conv_dim"] == ("4" if module == "locon" else "2")

    base = load_components(str(tiny_sd), ("unet",)).unet
    modules = modules_of(tensors)
    marks = {"lora": "lora_down.weight", "locon": "lora_down.weight", "loha": "hada_w1_a", "lokr": "lokr_w1",
             "dylora": "lora_down.weight"}
    assert all(marks[module] in parts for parts in modules.values())
    layers = kohya_layers(base)
    assert any(layers[name].weight.dim() == 4 and layers[name].weight.shape[-1] == 3 for name in modules)  # 3×3
    largest = add_to_base(base, modules)
    torch.testing.assert_close(unet_output(base), unet_output(result.unet), atol=1e-5, rtol=0)
    lora = read_lora(file)  # what `lora generate/merge/resize/info` see: the same ΔW, as exact LoRA factors
    assert {m.kind for m in lora.modules.values()} == {{"loha": "LoHa", "lokr": "LoKr"}.get(module, "LoRA")}
    for name, parts in modules.items():
        shape = layers[name].weight.shape
        torch.testing.assert_close(lora.modules[name].delta().reshape(shape), delta(parts, shape), atol=1e-6, rtol=0)
        assert lora.modules[name].weight_shape in (tuple(shape), tuple(shape[:2]))
    assert largest > 1e-4  # it trained: the check is not between two copies of the base


def test_loha_resumes_after_sigkill_bit_identical(tiny_sd, tmp_path):
    data = small_dataset(tmp_path / "data", images=4, repeats=6)
    preset = write_preset(tmp_path / "p.toml", tiny_sd, data, tmp_path / "unused",
                          dataset={"flip_aug": True},
                          network={"network_module": "loha", "network_dim": 4, "network_alpha": 2,
                                   "rank_dropout": 0.1, "module_dropout": 0.1, "conv_dim": 2},
                          optimizer={"learning_rate": 5e-3, "text_encoder_lr": 2e-3},
                          training={"max_train_steps": 12, "train_batch_size": 2},
                          output={"save_state_every_n_steps": 1, "save_last_n_states": 3})
    code, err = finish(train(preset, tmp_path / "reference"))
    assert code == 0, err[-3000:]
    kill_at = random.Random(os.urandom(8)).randint(2, 10)
    out = tmp_path / "out"
    process = train(preset, out)
    wait_for_step(out, kill_at, process)
    process.kill()
    process.wait()
    code, err = finish(train(preset, out, "--resume", "auto"))
    assert code == 0 and "resumed from" in err, err[-3000:]
    same_lora(out / "test.safetensors", tmp_path / "reference" / "test.safetensors")
    assert any(".hada_w2_b" in k and k.startswith("lora_te_") for k in load_file(str(out / "test.safetensors")))


def test_dylora_runs_a_prefix_of_the_ranks_at_alpha_over_b():
    from peft import LoraConfig, inject_adapter_in_model

    from lorasmith.train.dylora import RankSampler

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"lin": torch.nn.Linear(6, 5), "conv": torch.nn.Conv2d(3, 4, 3, padding=1)})
    inject_adapter_in_model(LoraConfig(r=6, lora_alpha=3, target_modules=["lin", "conv"]), model)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    ranks = RankSampler([model], unit=2)
    lin, conv = model["lin"], model["conv"]
    for layer in ranks.layers:
        ranks.set_rank(layer, 4)
    x, image = torch.randn(7, 6), torch.randn(2, 3, 5, 5)
    out_lin, out_conv = lin(x), conv(image)
    a, b = lin.lora_A["default"].weight, lin.lora_B["default"].weight
    expected = lin.base_layer(x) + 3 / 4 * x @ a[:4].T @ b[:, :4].T
    torch.testing.assert_close(out_lin, expected, atol=1e-6, rtol=0)
    ca, cb = conv.lora_A["default"].weight, conv.lora_B["default"].weight
    conv_expected = conv.base_layer(image) + 3 / 4 * torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(image, ca[:4], padding=1), cb[:, :4])
    torch.testing.assert_close(out_conv, conv_expected, atol=1e-5, rtol=0)
    (out_lin.square().sum() + out_conv.square().sum()).backward()
    for down, up in ((a, b), (ca, cb)):
        assert bool((down.grad[4:] == 0).all()) and bool((up.grad[:, 4:] == 0).all())  # above b: no change
        assert bool((down.grad[:4].flatten(1).abs().sum(1) > 0).all())  # every rank up to b trains
    ranks.full()
    assert lin.scaling["default"] == 0.5
    torch.testing.assert_close(lin(x), lin.base_layer(x) + 0.5 * x @ a.T @ b.T, atol=1e-6, rtol=0)
    generator = torch.Generator().manual_seed(0)
    drawn = {rank for _ in range(60) for rank in ranks.draw(generator)}
    assert drawn == {2, 4, 6}


def test_a_dylora_cut_to_fewer_ranks_is_the_model_at_those_ranks(tiny_sd, tmp_path, capsys, monkeypatch):
    from lorasmith.train.config import load_config
    from lorasmith.train.dylora import RankSampler

    drawn = []
    draw = RankSampler.draw
    monkeypatch.setattr(RankSampler, "draw", lambda self, generator: drawn.append(draw(self, generator)) or drawn[-1])
    from lorasmith.models.base import load_components
    from lorasmith.train.trainer import run
    from lorasmith.use.cli import main as lora

    preset = write_preset(tmp_path / "p.toml", tiny_sd, small_dataset(tmp_path / "data", images=2), tmp_path / "out",
                          network={"network_module": "dylora", "network_dim": 4, "network_alpha": 2, "unit": 2,
                                   "conv_dim": 2, "conv_alpha": 1},
                          optimizer={"learning_rate": 2e-2}, training={"max_train_steps": 4, "train_batch_size": 2})
    result, _ = run(load_config(preset), progress=False, log=lambda message: None)
    assert len(drawn) == 4 and {2, 4} <= {b for ranks in drawn for b in ranks} <= {2, 4}  # a draw per step
    file, cut = tmp_path / "out" / "test.safetensors", tmp_path / "cut.safetensors"
    lora(["info", str(file)])  # (the tiny model's names are not SD1.5's: the health check complains)
    assert "DyLoRA: its first 2, 4, … 4 ranks each work alone; `lora resize test.safetensors --rank N`" in \
        capsys.readouterr().out
    assert lora(["resize", str(file), "--rank", "3", "--out", str(cut)]) != 0
    assert "a DyLoRA trained in steps of 2 ranks: --rank must be a multiple of 2" in capsys.readouterr().err
    assert not cut.exists()
    assert lora(["resize", str(file), "--rank", "2", "--out", str(cut), "--save-precision", "fp32"]) == 0
    full, kept = modules_of(load_file(str(file))), modules_of(load_file(str(cut)))
    assert kept.keys() == full.keys()
    for name, parts in kept.items():
        assert parts["lora_down.weight"].shape[0] == 2 and float(parts["alpha"]) == float(full[name]["alpha"])
        torch.testing.assert_close(parts["lora_down.weight"], full[name]["lora_down.weight"][:2])
    with safe_open(str(cut), "pt") as handle:
        assert handle.metadata()["ss_network_module"] == "networks.lora"  # a plain LoRA now

    ranks = RankSampler([result.unet], unit=2)
    full_output = unet_output(result.unet)
    for layer in ranks.layers:
        ranks.set_rank(layer, min(2, layer.r["default"]))
    at_two = unet_output(result.unet)
    base = load_components(str(tiny_sd), ("unet",)).unet
    add_to_base(base, kept)
    torch.testing.assert_close(unet_output(base), at_two, atol=1e-5, rtol=0)
    assert float((at_two - full_output).abs().max()) > 1e-4  # the cut is its own, smaller model


@pytest.mark.parametrize("kind, rank", [("linear", 2), ("linear", 64), ("conv1x1", 2), ("conv3x3", 2),
                                        ("conv3x3", 64)])
def test_lokr_on_the_activations_equals_peft_building_the_whole_delta(kind, rank):
    """The bypass (LyCORIS' kron_bypass) gives peft's outputs and gradients, rank dropout included, for
    decomposed (rank 2) and whole (rank 64) Kronecker factors."""
    import copy

    from peft import inject_adapter_in_model
    from peft.tuners.lokr import LoKrLayer

    from lorasmith.train.lokr_bypass import use_bypass
    from lorasmith.train.network import adapter_config

    torch.manual_seed(0)
    base = {"linear": torch.nn.Linear(48, 40), "conv1x1": torch.nn.Conv2d(48, 40, 1),
            "conv3x3": torch.nn.Conv2d(48, 40, 3, padding=1, stride=2)}[kind]
    peft_model = torch.nn.ModuleDict({"m": base})
    inject_adapter_in_model(adapter_config("lokr", rank, 3.0, "^m$", rank_dropout=0.3), peft_model)
    for name, param in peft_model.named_parameters():
        if "lokr_" in name:
            torch.nn.init.normal_(param, std=0.2)
    bypass = copy.deepcopy(peft_model)
    assert use_bypass(bypass) == 1

    def never(*args, **kwargs):
        raise AssertionError("the bypass built ΔW")
    bypass["m"].get_delta_weight = never
    layer = peft_model["m"]
    assert isinstance(layer, LoKrLayer)
    assert ("default" in layer.lokr_w2) == (rank == 64)  # w2 whole at rank 64, decomposed at 2: both covered
    x = torch.randn(3, 7, 48) if kind == "linear" else torch.randn(2, 48, 9, 9)
    outputs = []
    for model in (peft_model, bypass):
        model.train()
        torch.manual_seed(5)  # the same rank-dropout draw for both
        out = model["m"](x)
        out.square().mean().backward()
        outputs.append((out, {n: p.grad for n, p in model.named_parameters() if "lokr_" in n}))
    (out_a, grads_a), (out_b, grads_b) = outputs
    torch.testing.assert_close(out_b, out_a, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4)


def _lycoris_loads(layer) -> bool:
    """Whether LyCORIS' loader (`LokrModule.make_module_from_state_dict`, as sd-scripts' lycoris.kohya calls it)
    rebuilds a peft LoKr layer from the tensors lorasmith saves for it."""
    from lycoris.modules.lokr import LokrModule

    from lorasmith.lorafile.export import layer_tensors

    t = layer_tensors(layer)
    parts = [t.get(name) for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")]
    try:
        with torch.no_grad():
            LokrModule.make_module_from_state_dict("m", layer.get_base_layer(), *parts, None, None, t["alpha"], None)
    except RuntimeError:  # a tensor does not fit the layer rebuilt from the guessed factor
        return False
    return True


def test_every_lokr_split_lorasmith_trains_is_one_lycoris_loader_rebuilds():
    """peft's split at the configured factor is kept exactly when LyCORIS' loader reads it back (`reads_back`
    predicts the loader), and is replaced by one it does read otherwise; SD1.5's 640×1920 3×3 convolution at
    factor -1 is the case that broke."""
    from peft import inject_adapter_in_model

    from lorasmith.train.lokr_split import reads_back, use_loadable_splits
    from lorasmith.train.network import adapter_config

    cases = [(out, in_, kernel, rank, factor) for out in (6, 8, 24, 40) for in_ in (8, 20, 72, 120)
             for kernel in (1, 3) for rank in (1, 2, 4) for factor in (-1, 2, 4, 8)] + [(640, 1920, 3, 8, -1)]
    broken, wrong = [], []
    for out, in_, kernel, rank, factor in cases:
        model = torch.nn.ModuleDict({"m": torch.nn.Conv2d(in_, out, kernel)})
        config = adapter_config("lokr", rank, rank / 2, "^m$", factor=factor)
        inject_adapter_in_model(config, model)
        raw = _lycoris_loads(model["m"])
        if raw != reads_back(out, in_, kernel * kernel, rank, factor):
            wrong.append((out, in_, kernel, rank, factor))
        assert use_loadable_splits(model, config) == (not raw)
        if not raw:
            broken.append((out, in_, kernel, rank, factor))
            assert _lycoris_loads(model["m"]), (out, in_, kernel, rank, factor)
    assert not wrong
    assert (24, 72, 3, 2, -1) in broken and (640, 1920, 3, 8, -1) in broken and (8, 8, 1, 1, 4) in broken
    assert len(broken) < len(cases) / 2  # most splits were readable and kept as configured
    assert tuple(model["m"].lokr_w1["default"].shape) == (20, 20)  # 640×1920: 20·32 × 20·96, not 20·32 × 40·48


def test_lycoris_loads_a_conv_lokr_at_factor_minus_1_with_lorasmiths_delta(tmp_path, monkeypatch):
    """A LoKr with conv_dim at factor -1 on a UNet whose up_blocks.1.resnets.0.conv1 (24 × 72, 3×3) is SD1.5's
    640 × 1920 in small: LyCORIS' own `create_lycoris_from_weights` loads every module of the saved file, and
    each module's ΔW is the one lorasmith's reader gives."""
    from diffusers import UNet2DConditionModel
    from lycoris import create_lycoris_from_weights
    from lycoris.wrapper import LycorisNetwork

    from lorasmith.lorafile.export import kohya_state_dict, save_lora
    from lorasmith.train.network import add_unet_lora

    shape = dict(block_out_channels=(24, 48), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, sample_size=16)
    torch.manual_seed(0)
    unet, base = UNet2DConditionModel(**shape), UNet2DConditionModel(**shape)
    add_unet_lora(unet, 4, 2, conv_dim=2, conv_alpha=1, module="lokr", factor=-1)
    for name, param in unet.named_parameters():
        if "lokr_" in name:
            torch.nn.init.normal_(param, std=0.2)  # a trained-looking ΔW: peft starts every module at zero
    file = save_lora(tmp_path / "lokr.safetensors", kohya_state_dict(unet), {"ss_network_module": "lycoris.kohya"})
    tensors = load_file(str(file))
    w2b = tensors["lora_unet_up_blocks_1_resnets_0_conv1.lokr_w2_b"]
    assert w2b.dim() == 2 and w2b.shape[0] == 2 and w2b.shape[1] % 9 == 0  # decomposed, its 3×3 kernel flattened

    monkeypatch.setattr(LycorisNetwork, "LORA_PREFIX", "lora_unet")  # its preset key lora_prefix; default "lycoris"
    network, _ = create_lycoris_from_weights(1.0, str(file), base)
    lora = read_lora(file)
    loaded = {module.lora_name: module for module in network.loras}
    assert loaded.keys() == lora.modules.keys() == modules_of(tensors).keys() and len(loaded) == 79
    assert sum(len(module.shape) == 4 and module.shape[-1] == 3 for module in loaded.values()) == 18
    largest = 0.0
    for name, module in loaded.items():
        with torch.no_grad():
            theirs = module.get_weight(module.shape)  # what its forward adds at multiplier 1
        ours = lora.modules[name].delta().reshape(module.shape)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
        largest = max(largest, float(ours.abs().max()))
    assert largest > 1e-2
