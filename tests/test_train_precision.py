"""The GPU presets' precisions on the CPU: bf16 mixed precision end to end (train, sample, save, resume
bit-identical) and an fp8-stored frozen base (model.base_precision = "fp8")."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_dataset, write_preset
from lorasmith.train import cli

PROMPTS = "claymation style, a blob --w 64 --h 64 --s 2 --d 3\n"


def preset(root: Path, base_model: Path, **sections) -> Path:
    data = root / "data"
    if not data.exists():
        small_dataset(data, images=3, repeats=2, size=(64, 64))
        (root / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    base = dict(dataset={"resolution": 64, "max_bucket_reso": 128, "flip_aug": True},
                training={"max_train_steps": 4, "train_batch_size": 1},
                sample={"sample_prompts": str(root / "prompts.txt"), "sample_every_n_steps": 2},
                output={"save_state_every_n_steps": 1, "save_last_n_states": 4})
    model = sections.pop("model", {})
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    path = write_preset(root / "p.toml", base_model, data, root / "out", **base)
    if model:
        import toml

        written = toml.loads(path.read_text(encoding="utf-8"))
        written["model"].update(model)
        path.write_text(toml.dumps(written), encoding="utf-8")
    return path


@pytest.fixture
def fresh_accelerator():
    """accelerate keeps one precision per process; earlier in-process runs of the suite set fp32."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_trains_samples_saves_and_resumes_bit_identical(tiny_sd, tmp_path, capsys, fresh_accelerator):
    path = preset(tmp_path, tiny_sd, training={"mixed_precision": "bf16"},
                  optimizer={"learning_rate": 5e-3, "text_encoder_lr": 2e-3})
    assert cli.main([str(path), "--quiet"]) == 0
    out = tmp_path / "out"
    reference = out / "reference.safetensors"
    (out / "test.safetensors").rename(reference)
    tensors = load_file(str(reference))
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    assert len(list((out / "test.samples").glob("*-grid.png"))) == 2
    loss = (out / "test.logs" / "loss.csv").read_text().splitlines()[1:]
    assert len(loss) == 4 and all(math.isfinite(float(row.split(",")[2])) for row in loss)

    state = next(p for p in (out / "test.state").iterdir() if p.name.startswith("step-00000002"))
    capsys.readouterr()
    assert cli.main([str(path), "--quiet", "--resume", str(state)]) == 0
    assert "resumed from" in capsys.readouterr().err
    again = load_file(str(out / "test.safetensors"))
    assert sorted(again) == sorted(tensors)
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("base", ["tiny_sd", "tiny_flux"])
def test_an_fp8_base_stores_frozen_weights_in_fp8_and_trains_like_fp32(base, request, tmp_path):
    """SD1's UNet and Flux's transformer alike (its text encoders, T5 included, are stored in fp8 too)."""
    from lorasmith.train.config import load_config
    from lorasmith.train.trainer import run

    losses, keys = {}, {}
    for precision in ("auto", "fp8"):
        root = tmp_path / precision
        root.mkdir()
        path = preset(root, request.getfixturevalue(base), model={"base_precision": precision},
                      sample={"sample_prompts": ""}, output={"save_state": False},
                      dataset={"t5xxl_max_token_length": 32, "resolution": 64, "max_bucket_reso": 128})
        result, _ = run(load_config(path), progress=False, log=lambda message: None)
        losses[precision] = result.losses
        params = dict(result.unet.named_parameters())
        frozen = {p.dtype for n, p in params.items() if ".lora_" not in n and p.dim() >= 2}  # Linear/conv weights
        adapters = {p.dtype for n, p in params.items() if ".lora_" in n}
        assert adapters == {torch.float32}
        assert frozen == ({torch.float8_e4m3fn} if precision == "fp8" else {torch.float32})
        saved = load_file(str(root / "out" / "test.safetensors"))
        assert saved and all(torch.isfinite(t).all() for t in saved.values())
        keys[precision] = sorted(saved)
    assert keys["fp8"] == keys["auto"]  # the same modules, named the same way
    # the same steps on a base rounded to fp8: close to fp32's losses, not equal to them
    assert losses["fp8"] != losses["auto"]
    assert losses["fp8"] == pytest.approx(losses["auto"], rel=0.25)
