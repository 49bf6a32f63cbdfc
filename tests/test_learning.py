"""train-lora must teach: a short seeded run on the toy base model (toy/base) gives a LoRA whose samples carry
the clay style the base never drew, loaded the way users load it (diffusers' `load_lora_weights`).

Measured here: base style about 0, this run's LoRA about 0.29 (0.12 at weight 0.5). The thresholds sit
well below that, so only a change that breaks learning fails here: a wrong alpha, a LoRA that never reaches
the UNet, a frozen adapter, a wrong noise target. Not a timing test.
"""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO))
from toy import scores, world  # noqa: E402

BASE = REPO / "toy" / "base"
STEPS = 160


def write_dataset(root, count: int = 16):
    folder = root / "10_claymation style"
    folder.mkdir(parents=True)
    for i, (image, scene) in enumerate(world.pictures(11, count, style=True)):
        image.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(world.caption(scene.colour, scene.shape, style=True), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lorasmith.train.config import load_config
    from lorasmith.train.trainer import run

    root = tmp_path_factory.mktemp("learn")
    write_dataset(root / "data")
    (root / "prompts.txt").write_text("claymation style, a red circle --w 64 --h 64 --s 10 --d 1\n", encoding="utf-8")
    preset = root / "preset.toml"
    preset.write_text(f"""config_version = 1
[model]
pretrained_model = "{BASE}"
[dataset]
train_data_dir = "{root / 'data'}"
resolution = 64
min_bucket_reso = 64
max_bucket_reso = 64
[network]
network_dim = 8
network_alpha = 8
[optimizer]
optimizer_type = "AdamW"
learning_rate = 1e-3
text_encoder_lr = 0
[training]
max_train_steps = {STEPS}
train_batch_size = 8
seed = 1
[output]
output_dir = "{root / 'out'}"
output_name = "clay"
save_state = false
log_tensorboard = false
[sample]
sample_prompts = "{root / 'prompts.txt'}"
sample_at_first = true
""", encoding="utf-8")
    run(load_config(preset), progress=False, log=lambda message: None)
    return root / "out"


def styles(lora, weight: float = 1.0) -> tuple[float, float]:
    """(mean style score, content accuracy) of one sample per colour × shape with the trigger phrase."""
    from toy.sampling import pipeline, sample

    samples = sample(pipeline(BASE, lora, weight), style=True, seeds=[0], steps=15)
    return (sum(scores.style_score(im) for im, *_ in samples) / len(samples),
            scores.content_accuracy([(im, c, s) for im, c, s, _ in samples]))


def test_a_short_run_teaches_the_base_model_the_style(trained):
    base_style, base_content = styles(None)
    lora_style, lora_content = styles(trained / "clay.safetensors")
    half_style, _ = styles(trained / "clay.safetensors", 0.5)
    assert base_style < 0.1, base_style  # the base model draws flat shapes, trigger or not
    assert base_content >= 0.4, base_content
    assert lora_style > base_style + 0.15, (base_style, lora_style)
    assert lora_content >= 0.25, lora_content  # still shapes of the prompted colours, not one learned blob
    assert base_style < half_style < lora_style  # the strength slider works in between


def test_samples_during_training_have_the_prompted_size_with_a_small_vae(trained):
    """The toy VAE has three blocks (4 pixels per latent, not SD's 8): sample latents follow its config."""
    grids = sorted((trained / "clay.samples").glob("*-00.png"))
    assert len(grids) == 2  # before training and at the end
    for path in grids:
        with Image.open(path) as image:
            assert image.size == (64, 64)
