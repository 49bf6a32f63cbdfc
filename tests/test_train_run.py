"""Training on the tiny model: parity with diffusers' loader, learning, caches, dataset rules, the command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import make_image, small_dataset, write_preset
from lorasmith.train.config import load_config
from lorasmith.train.dataset import load_dataset, process_caption
from lorasmith.lorafile.export import text_key
from lorasmith.train.latents import LatentCache, cache_latents, latent_key, vae_identity
from lorasmith.train.plan import bucket_resolutions
from lorasmith.train.trainer import Trainer, plan_run, run

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd):
    """One short run with the text encoder trained, alpha ≠ rank and clip skip 2, saved in float32."""
    root = tmp_path_factory.mktemp("run")
    preset = write_preset(root / "p.toml", tiny_sd, small_dataset(root / "data"), root / "out",
                          network={"network_dim": 4, "network_alpha": 6},
                          optimizer={"learning_rate": 1e-2, "text_encoder_lr": 1e-2},
                          training={"max_train_steps": 5, "clip_skip": 2, "train_batch_size": 2})
    config = load_config(preset)
    result, plan = run(config, progress=False)
    return config, result, plan


def test_saved_file_loads_in_diffusers_with_the_same_outputs(trained, tiny_sd):
    from diffusers import StableDiffusionPipeline

    config, result, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(result.outputs[-1]))
    torch.manual_seed(0)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    ids = pipe.tokenizer(["claymation style, a ball", "blob"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    result.unet.eval()
    result.text_encoder.eval()
    with torch.no_grad():
        ours, theirs, plain = (m(x, t, context).sample for m in (result.unet, pipe.unet, base.unet))
        assert (ours - theirs).abs().max() <= 1e-5
        assert (ours - plain).abs().max() > 1e-3  # the LoRA really changes the output
        te_ours, te_theirs = result.text_encoder(ids)[0], pipe.text_encoder(ids)[0]
        assert (te_ours - te_theirs).abs().max() <= 1e-5
        assert (te_ours - base.text_encoder(ids)[0]).abs().max() > 1e-4


def test_kohya_keys_alpha_and_metadata(trained):
    config, result, plan = trained
    with safe_open(str(result.outputs[-1]), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        alphas = {k: f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in keys
    # clip_skip 2 takes layer 1's output: layer 2 of the 3 would never train, so it has no adapter
    assert not any(k.startswith("lora_te_text_model_encoder_layers_2_") for k in keys)
    assert not any(k.startswith("lora_te1_") for k in keys)
    assert set(alphas.values()) == {6.0}  # the configured alpha, not the rank (4)
    assert len(keys) == 3 * len(alphas)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_clip_skip"]) == ("4", "6.0", "2")
    assert meta["ss_steps"] == "5" and meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_dataset_dirs"]) == {"10_clay": {"n_repeats": 10, "img_count": 3}}
    assert json.loads(meta["ss_tag_frequency"])["10_clay"]["claymation style"] == 3
    assert meta["modelspec.trigger_phrase"] == "clay" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8
    resolved = Path(config.output.output_dir) / "test.config.toml"
    assert "optimizer steps: 5" in resolved.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "path, key",
    [("encoder.layers.3.self_attn.q_proj", "lora_te_text_model_encoder_layers_3_self_attn_q_proj"),
     ("text_model.encoder.layers.11.mlp.fc1", "lora_te_text_model_encoder_layers_11_mlp_fc1")],
)
def test_text_keys_are_the_same_for_both_clip_layouts(path, key):
    assert text_key(path) == key


def test_loss_falls_on_a_fixed_batch(tmp_path, tiny_sd):
    preset = write_preset(tmp_path / "p.toml", tiny_sd, small_dataset(tmp_path / "data", images=2), tmp_path / "out",
                          optimizer={"learning_rate": 1e-2}, training={"max_train_steps": 40, "train_batch_size": 2},
                          schedule={"lr_scheduler": "constant", "lr_warmup_steps": 0})
    config = load_config(preset)
    dataset, plan = plan_run(config)
    trainer = Trainer(config, dataset, plan, progress=False)
    trainer.load()
    trainer.cache()
    trainer.load_unet()
    trainer.setup_network()
    trainer.prediction = "epsilon"
    import random

    trainer.rng = random.Random(0)
    batch = dataset.items[:2]
    losses = []
    for _ in range(40):
        trainer.generator = torch.Generator().manual_seed(0)  # the same noise and timesteps every step
        losses.append(trainer._step(batch))
    assert losses[-1] < losses[20] < losses[0] and losses[-1] < 0.8 * losses[0], losses


def test_latent_cache_hits_and_misses(tmp_path, tiny_sd):
    from diffusers import AutoencoderKL

    from lorasmith.train.dataset import load_pixels

    data = small_dataset(tmp_path / "data", images=3)
    buckets = bucket_resolutions(128, 64, 256)
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    vae_id = vae_identity(vae)

    def jobs(dataset, ident):
        return [(latent_key(i.content, i.bucket, False, ident), i, False) for i in dataset.items]

    first = LatentCache(tmp_path / "cache")
    cache_latents(jobs(load_dataset(data, None, ".txt", buckets), vae_id), vae, first, load_pixels, progress=False)
    assert (first.hits, first.misses) == (0, 3)
    second = LatentCache(tmp_path / "cache")  # a new run: read from disk
    cache_latents(jobs(load_dataset(data, None, ".txt", buckets), vae_id), vae, second, load_pixels, progress=False)
    assert (second.hits, second.misses) == (3, 0)
    make_image(data / "10_clay" / "img1.png", size=(128, 128), seed=99)  # one picture changes
    third = LatentCache(tmp_path / "cache")
    cache_latents(jobs(load_dataset(data, None, ".txt", buckets), vae_id), vae, third, load_pixels, progress=False)
    assert (third.hits, third.misses) == (2, 1)
    torch.manual_seed(5)
    other = AutoencoderKL.from_config(vae.config)  # same architecture, other weights
    other_id = vae_identity(other)
    assert other_id != vae_id
    fourth = LatentCache(tmp_path / "cache")
    cache_latents(jobs(load_dataset(data, None, ".txt", buckets), other_id), other, fourth, load_pixels, progress=False)
    assert (fourth.hits, fourth.misses) == (0, 3)


def test_dataset_rules(tmp_path):
    data = small_dataset(tmp_path / "data", images=2, captions=False)
    (data / "10_clay" / "img0.txt").write_text("a caption", encoding="utf-8")
    make_image(data / "3_other style" / "wide.png", size=(256, 128))
    reg = small_dataset(tmp_path / "reg", images=1, repeats=1, captions=False)
    dataset = load_dataset(data, reg, ".txt", bucket_resolutions(128, 64, 256))
    captions = {i.image.name: i.caption for i in dataset.items}
    assert captions == {"img0.png": "a caption", "img1.png": "clay", "wide.png": "other style"}
    assert any("img1.png: no caption" in w for w in dataset.warnings)
    assert {i.image.name: i.bucket for i in dataset.items}["wide.png"] == (192, 64)  # no 2:1 bucket fits 128²: 3:1 is closest
    assert dataset.bucket_counts()[(128, 128)] == 20
    reg_items = dataset.epoch_items(reg=True)
    assert sum(n for _, n in reg_items) == 23  # regularisation matched to the 23 training views


def test_metadata_jsonl_folder(tmp_path):
    make_image(tmp_path / "a.png", size=(128, 128))
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "claymation style, a"}\n', encoding="utf-8")
    dataset = load_dataset(tmp_path, None, ".txt", bucket_resolutions(128, 64, 256))
    assert [(i.caption, i.repeats) for i in dataset.items] == [("claymation style, a", 1)]


@pytest.mark.parametrize(
    "shuffle, keep, dropout, seed, expected",
    [(False, 0, 0.0, 0, "clay, a, b, c"), (True, 1, 0.0, 0, None), (False, 0, 0.999, 0, "")],
)
def test_caption_processing(shuffle, keep, dropout, seed, expected):
    import random

    got = process_caption("clay, a, b, c", shuffle, keep, dropout, random.Random(seed))
    if expected is None:
        assert got.startswith("clay, ") and sorted(got.split(", ")) == ["a", "b", "c", "clay"]
    else:
        assert got == expected


def test_cli_dry_run_and_missing_model(tmp_path, tiny_sd):
    data = small_dataset(tmp_path / "data")
    preset = write_preset(tmp_path / "p.toml", tmp_path / "no-model", data, tmp_path / "out")
    dry = subprocess.run([str(BIN / "train-lora"), str(preset), "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "optimizer steps: 4 (max_train_steps; 15 per epoch" in dry.stdout
    assert not (tmp_path / "out").exists()
    done = subprocess.run([str(BIN / "train-lora"), str(preset), "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert f"base model '{tmp_path / 'no-model'}' not found" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_two_cpu_processes_end_with_identical_weights_and_resume_exactly(tmp_path, request, family):
    """`accelerate launch --multi_gpu --num_processes 2` on CPU: gradients are synchronised, so both ranks
    (which see different batches and noise) hold the same LoRA afterwards. SDXL with both text encoders
    trained; SD1.x as a DyLoRA, whose ranks each process draws for itself, also resumed from a mid-run state
    (each rank restores its own RNG, whatever the family) to the same weights again."""
    import os
    import shutil

    model = request.getfixturevalue("tiny_sd" if family == "sd1" else "tiny_xl")
    sizes = {} if family == "sd1" else {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128}
    network = {"network_module": "dylora", "unit": 2} if family == "sd1" else {}
    preset = write_preset(tmp_path / "p.toml", model, small_dataset(tmp_path / "data"), tmp_path / "out",
                          dataset={"flip_aug": True, **sizes}, network={"network_dropout": 0.1, **network},
                          optimizer={"learning_rate": 1e-2, "text_encoder_lr": 1e-2},
                          training={"max_train_steps": 4, "train_batch_size": 2},
                          output={"save_state_every_n_steps": 1, "save_last_n_states": 5})

    def launch(folder: Path, *resume: str) -> None:
        folder.mkdir(exist_ok=True)
        command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", str(Path(__file__).parent / "ddp_worker.py"),
                   str(preset), str(folder), *resume]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**os.environ, "ACCELERATE_USE_CPU": "1"})
        assert done.returncode == 0, done.stderr[-3000:]

    launch(tmp_path / "whole")
    with safe_open(str(tmp_path / "whole" / "rank0.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "whole" / "rank1.safetensors"), "pt") as b:
        assert a.metadata()["processes"] == "2" and a.metadata()["steps"] == "4"
        keys = sorted(a.keys())
        assert keys == sorted(b.keys()) and len(keys) > 0
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in keys)
        assert max(a.get_tensor(k).abs().max().item() for k in keys if "lora_up" in k) > 0  # it trained
        assert any(k.startswith("lora_te2_") for k in keys) == (family == "sdxl")
    assert (tmp_path / "out" / "test.safetensors").exists()  # rank 0 alone saves
    if family != "sd1":
        return
    state = next((tmp_path / "out" / "test.state").glob("step-00000002-*"))
    assert len(torch.load(state / "training.pt", weights_only=True)["rng"]) == 2  # one RNG record per rank
    shutil.copytree(state, tmp_path / "copy")
    launch(tmp_path / "resumed", str(tmp_path / "copy"))
    with safe_open(str(tmp_path / "whole" / "rank0.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "resumed" / "rank1.safetensors"), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_epoch_saves_and_the_final_file(tmp_path, tiny_sd):
    data = small_dataset(tmp_path / "data", images=3, repeats=1)
    preset = write_preset(tmp_path / "p.toml", tiny_sd, data, tmp_path / "out",
                          training={"max_train_steps": 0, "max_train_epochs": 3, "train_batch_size": 2},
                          output={"save_every_n_epochs": 1})
    result, plan = run(load_config(preset), progress=False)
    assert plan.total_steps == 6  # 3 pictures at batch 2: 2 batches per epoch, 3 epochs
    assert [p.name for p in result.outputs] == ["test-000001.safetensors", "test-000002.safetensors", "test.safetensors"]
    with safe_open(str(result.outputs[0]), "pt") as first, safe_open(str(result.outputs[-1]), "pt") as last:
        assert (first.metadata()["ss_epoch"], first.metadata()["ss_steps"]) == ("1", "2")
        assert (last.metadata()["ss_epoch"], last.metadata()["ss_steps"]) == ("3", "6")
    assert not list((tmp_path / "out").glob(".*.part"))


def test_accumulation_steps_at_each_epoch_end_as_planned_and_resumes_exactly(tmp_path, tiny_sd):
    """3 batches per epoch at accumulation 2 (Kohya's count: ceil(3 / 2) = 2 steps per epoch): the epoch's last,
    lone batch still makes a step, the linear schedule reaches 0, and a state written at the epoch's end holds
    no pending gradient, so resuming from it (or from mid-epoch) ends with the same LoRA."""
    import csv

    from safetensors.torch import load_file

    from lorasmith.train.state import check_resume, load_resume

    data = small_dataset(tmp_path / "data", images=3, repeats=1)
    preset = write_preset(tmp_path / "p.toml", tiny_sd, data, tmp_path / "out",
                          training={"max_train_steps": 0, "max_train_epochs": 2, "train_batch_size": 1,
                                    "gradient_accumulation_steps": 2},
                          schedule={"lr_scheduler": "linear", "lr_warmup_steps": 0},
                          output={"save_every_n_epochs": 1, "save_state_every_n_steps": 1, "save_last_n_states": 9})
    config = load_config(preset)
    result, plan = run(config, progress=False)
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (3, 2, 4)
    with open(tmp_path / "out" / "test.logs" / "loss.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["step"], r["epoch"]) for r in rows] == [("1", "1"), ("2", "1"), ("3", "2"), ("4", "2")]
    assert [float(r["lr"]) for r in rows] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0.0])
    assert len(result.losses) == 4
    with safe_open(str(result.outputs[-1]), "pt") as f:
        assert (f.metadata()["ss_epoch"], f.metadata()["ss_steps"]) == ("2", "4")
    assert all(p.grad is None for p in result.unet.parameters())  # nothing left pending after the last step
    whole = load_file(str(result.outputs[-1]))
    for step in (2, 3):  # at the end of epoch 1 (after its lone batch), and one step into epoch 2
        config.output.output_dir = str(tmp_path / f"resumed-{step}")
        state = next((tmp_path / "out" / "test.state").glob(f"step-{step:08d}-*"))
        loaded = load_resume(config, str(state))
        check_resume(config, *plan_run(config), loaded, force=False)
        resumed, _ = run(config, progress=False, resume=loaded)
        again = load_file(str(resumed.outputs[-1]))
        assert sorted(again) == sorted(whole) and all(torch.equal(again[k], whole[k]) for k in whole), step


@pytest.mark.parametrize("public", [True, False])
def test_report_draws_the_sd1_band_only_for_a_public_sd1_base(tmp_path, tiny_sd, monkeypatch, public):
    from lorasmith.models.family_sd import SD1

    if public:  # the tiny model's text encoder shape taken for SD1.x's published one
        monkeypatch.setattr(SD1, "public_text", (32, 3))
    preset = write_preset(tmp_path / "p.toml", tiny_sd, small_dataset(tmp_path / "data", images=2, repeats=1),
                          tmp_path / "out", training={"max_train_steps": 1})
    result, _ = run(load_config(preset), progress=False)
    page = result.report.read_text(encoding="utf-8")
    assert ('<rect class="band"' in page) == public
    assert ("0.08–0.10: the band SD1.x LoRA guides call healthy" in page) == public
    assert ("No healthy loss band is published for this base" in page) != public


def test_adamw8bit_keeps_8bit_state_on_cpu():
    """bitsandbytes ≥ 0.50 runs its 8-bit optimizers on CPU; tensors of 4,096+ elements get uint8 state."""
    from lorasmith.train.optim import build_optimizer

    big = torch.nn.Parameter(torch.randn(64, 128))  # 8,192 elements
    small = torch.nn.Parameter(torch.randn(8, 8))  # under bitsandbytes' min_8bit_size: 32-bit state
    optimizer = build_optimizer("AdamW8bit", [{"params": [big, small], "lr": 1e-2}], 0.0)
    before = big.detach().clone()
    (big.sum() + small.sum()).backward()
    optimizer.step()
    assert optimizer.state[big]["state1"].dtype == torch.uint8
    assert optimizer.state[small]["state1"].dtype == torch.float32
    assert not torch.equal(before, big.detach())
