"""Network types (LoRA, LoCon, LoHa, LoKr): the file each writes, read back with the algorithm's published
formula, is the model that trained; LoHa resumes bit-identically after SIGKILL."""

import json
import os
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import small_dataset, write_preset
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


@pytest.mark.parametrize("module", ["lora", "locon", "loha", "lokr"])
def test_the_file_rebuilt_by_the_published_formula_is_the_live_model(module, tiny_sd, tmp_path):
    from lorasmith.train.config import load_config
    from lorasmith.train.models import load_components
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
    expected_module = "lycoris.kohya" if module in ("loha", "lokr") else "networks.lora"
    assert meta["ss_network_module"] == expected_module
    args = json.loads(meta["ss_network_args"])
    assert args.get("algo") == (module if module in ("loha", "lokr") else None)
    assert args["conv_dim"] == ("4" if module == "locon" else "2")

    base = load_components(str(tiny_sd), ("unet",)).unet
    layers = {"lora_unet_" + name.replace(".", "_"): m for name, m in base.named_modules()}
    by_module: dict[str, dict] = {}
    for key, tensor in tensors.items():
        name, suffix = key.split(".", 1)
        by_module.setdefault(name, {})[suffix] = tensor
    marks = {"lora": "lora_down.weight", "locon": "lora_down.weight", "loha": "hada_w1_a", "lokr": "lokr_w1"}
    assert all(marks[module] in parts for parts in by_module.values())
    assert any(layers[name].weight.dim() == 4 and layers[name].weight.shape[-1] == 3 for name in by_module)  # 3×3
    largest = 0.0
    with torch.no_grad():
        for name, parts in by_module.items():
            change = delta(parts, layers[name].weight.shape)
            layers[name].weight += change
            largest = max(largest, float(change.abs().max()))
        sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
        live = result.unet.eval()(sample, 500, context).sample
        torch.testing.assert_close(base(sample, 500, context).sample, live, atol=1e-5, rtol=0)
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
