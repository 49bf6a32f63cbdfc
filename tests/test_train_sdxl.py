"""train-lora on SDXL: a tiny SDXL base (diffusers folder and single file, both built in the test) trained with
both text encoders; the file as Kohya writes it, loaded by diffusers; the size/crop conditioning; resume."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import small_dataset, write_preset
from lorasmith.train.dataset import crop_geometry

BIN = Path(sys.executable).parent
CAT = [49406, 320, 1125, 539, 320, 2368, 49407]
PROMPTS = "claymation style, a blob --w 64 --h 64 --s 2 --n blurry\n"


@pytest.fixture(scope="module")
def xl(tmp_path_factory, tiny_xl):
    """(diffusers folder, single file, dataset root) of one tiny SDXL."""
    from lorasmith.models.base import load_components
    from lorasmith.models.checkpoint import original_state_dict, save_checkpoint

    root = tmp_path_factory.mktemp("xl")
    folder = tiny_xl
    parts = load_components(str(folder), ("text_encoder", "text_encoder_2", "vae", "unet"), families=("sdxl",))
    file = save_checkpoint(root / "xl.safetensors", original_state_dict(parts.unet, parts.vae, parts.text_encoder,
                                                                        parts.text_encoder_2), {})
    data = small_dataset(root / "data", images=4, repeats=4, size=(96, 64))
    (root / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    return folder, file, data, root / "prompts.txt"


def preset(root: Path, model: Path, data: Path, **sections) -> Path:
    sections.setdefault("dataset", {})
    sections["dataset"] = {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, **sections["dataset"]}
    return write_preset(root / "p.toml", model, data, root / "out", **sections)


@pytest.mark.parametrize("size, bucket, flip, expected", [
    # 1000×600 into 512²: cover-resized to 853.3×512, 170.7 px cut on each side
    ((1000, 600), (512, 512), False, (600, 1000, 0, 171, 512, 512)),
    ((1000, 600), (512, 512), True, (600, 1000, 0, 170, 512, 512)),
    # 700×1000 into 512×768: resized to 537.6×768, 12.8 px cut left
    ((700, 1000), (512, 768), False, (1000, 700, 0, 13, 768, 512)),
    # 600×1000 into 768×512: resized to 768×1280, 384 px cut top
    ((600, 1000), (768, 512), False, (1000, 600, 384, 0, 512, 768)),
    ((640, 960), (512, 768), True, (960, 640, 0, 0, 768, 512)),  # same aspect: no crop
])
def test_time_ids_of_a_cropped_bucketed_picture_match_a_hand_computation(size, bucket, flip, expected):
    from lorasmith.models.families import family_named

    assert crop_geometry(size, bucket, flip) == expected
    cond = {"context": torch.zeros(1, 77, 64), "pooled": torch.zeros(1, 32)}
    inputs = family_named("sdxl").unet_inputs(cond, [crop_geometry(size, bucket, flip)])
    assert inputs["added_cond_kwargs"]["time_ids"].tolist() == [list(map(float, expected))]


def test_sdxl_lora_is_kohya_named_and_loads_in_diffusers_as_trained(xl, tmp_path, monkeypatch):
    """Both text encoders trained, flips, a held-out picture, samples: the saved file, loaded into a fresh SDXL
    pipeline with diffusers' `load_lora_weights`, gives the live model's UNet and both encoders within 1e-5.
    The report draws no loss band: SD1.5's would mislead on SDXL."""
    from diffusers import StableDiffusionXLPipeline

    from lorasmith.train.config import load_config
    from lorasmith.models.family_sdxl import SDXL
    from lorasmith.train.trainer import run

    monkeypatch.setattr(SDXL, "public_text", (32, 2))  # the tiny base counts as public: no band all the same

    folder, _, data, prompts = xl
    path = preset(tmp_path, folder, data, dataset={"flip_aug": True, "validation_split": 0.25},
                  network={"conv_dim": 2, "conv_alpha": 1},
                  optimizer={"learning_rate": 1e-2, "text_encoder_lr": 1e-2},
                  sample={"sample_prompts": str(prompts), "sample_every_n_steps": 4})
    result, _ = run(load_config(path), progress=False, log=lambda message: None)
    file = tmp_path / "out" / "test.safetensors"
    with safe_open(str(file), "pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
    prefixes = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                "lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_")
    assert all(k.startswith(prefixes) for k in keys), [k for k in keys if not k.startswith(prefixes)][:3]
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in keys
    assert "lora_unet_output_blocks_0_0_in_layers_2.lora_down.weight" in keys  # LoCon: a ResNet 3×3 conv
    # the context takes CLIP-L's penultimate layer: its last layer gets no adapter (it would never train);
    # bigG's last layer feeds the pooled embedding and keeps one
    assert not any(k.startswith("lora_te1_text_model_encoder_layers_1_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_1_") for k in keys)
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"], meta["ss_v2"]) == (
        "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "False")
    assert len(result.validation) >= 1 and len(list((tmp_path / "out" / "test.samples").glob("*-grid.png"))) == 1
    page = result.report.read_text(encoding="utf-8")
    assert 'class="band"' not in page and 'class="in-band"' not in page and "No healthy loss band" in page

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    base = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.load_lora_weights(load_file(str(file)))
    ids = torch.tensor([CAT + [49407] * 70])
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(2))
    added = {"text_embeds": torch.randn(2, 32, generator=torch.Generator().manual_seed(3)),
             "time_ids": torch.tensor([[64.0, 96, 0, 16, 64, 64]] * 2)}
    live = [m.eval() for m in (result.unet, *result.text_encoders)]
    with torch.no_grad():
        for ours, theirs, before in zip(live[1:], (pipe.text_encoder, pipe.text_encoder_2),
                                        (base.text_encoder, base.text_encoder_2)):
            a, b = ours(ids, output_hidden_states=True), theirs(ids, output_hidden_states=True)
            torch.testing.assert_close(a.hidden_states[-2], b.hidden_states[-2], atol=1e-5, rtol=0)
            assert (a.hidden_states[-2] - before(ids, output_hidden_states=True).hidden_states[-2]).abs().max() > 1e-4
        torch.testing.assert_close(live[1](ids)[0], pipe.text_encoder(ids)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(live[2](ids).text_embeds, pipe.text_encoder_2(ids).text_embeds, atol=1e-5, rtol=0)
        ours = live[0](sample, 300, context, added_cond_kwargs=added).sample
        torch.testing.assert_close(ours, pipe.unet(sample, 300, context, added_cond_kwargs=added).sample,
                                   atol=1e-5, rtol=0)
        assert (ours - base.unet(sample, 300, context, added_cond_kwargs=added).sample).abs().max() > 1e-4


def test_a_single_file_sdxl_trains_offline_and_resumes_bit_identical(xl, tmp_path):
    """The single file through the CLI with the hub unreachable; a copy of the run cut back to its step-2 state
    and resumed ends with the same LoRA as the uninterrupted run."""
    _, file, data, _ = xl
    path = preset(tmp_path, file, data, optimizer={"text_encoder_lr": 1e-3},
                  training={"max_train_steps": 4, "train_batch_size": 1},
                  output={"save_state_every_n_steps": 2, "save_last_n_states": 3})
    env = {"HF_HUB_OFFLINE": "1", "PATH": str(BIN)}
    run = subprocess.run([BIN / "train-lora", str(path), "--quiet"], capture_output=True, text=True, timeout=300,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[0] == "base model: xl.safetensors, a single-file SDXL base checkpoint"
    out, cut = tmp_path / "out", tmp_path / "cut"
    shutil.copytree(out, cut)
    for later in [p for p in (cut / "test.state").glob("step-*") if not p.name.startswith("step-00000002")]:
        shutil.rmtree(later)
    (cut / "test.safetensors").unlink()
    resumed = subprocess.run([BIN / "train-lora", str(path), "--quiet", "--resume", "auto", "--set",
                              f"output.output_dir={cut}"], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    a, b = load_file(str(out / "test.safetensors")), load_file(str(cut / "test.safetensors"))
    assert sorted(a) == sorted(b) and any(k.startswith("lora_te2_") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_clip_skip_on_sdxl_is_refused_in_one_sentence(xl, tmp_path):
    folder, _, data, _ = xl
    path = preset(tmp_path, folder, data, training={"clip_skip": 2})
    run = subprocess.run([BIN / "train-lora", str(path), "--quiet"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].endswith(
        "training.clip_skip = 2 does not apply to SDXL, which already takes the penultimate layer of both text "
        "encoders: set 1")
