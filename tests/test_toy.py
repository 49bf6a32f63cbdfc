"""The toy world's pictures and metrics, and the shipped toy base model against the script that built it."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO))
from toy import build, scores, world  # noqa: E402

BASE = REPO / "toy" / "base"


@pytest.mark.parametrize("colour", list(world.COLOURS))
@pytest.mark.parametrize("shape", world.SHAPES)
@pytest.mark.parametrize("style", [False, True])
def test_every_drawn_picture_reads_back_as_its_caption(colour, shape, style):
    for seed in range(3):
        scene = world.random_scene(random.Random(seed), colour=colour, shape=shape)
        reading = scores.read(world.draw(scene, style))
        assert (reading.colour, reading.shape) == (colour, shape)
        assert reading.iou > 0.85
        assert reading.matches(colour, shape)


def test_a_wrong_colour_or_shape_does_not_match():
    scene = world.random_scene(random.Random(0), colour="red", shape="square")
    reading = scores.read(world.draw(scene))
    assert not reading.matches("blue", "square")
    assert not reading.matches("red", "circle")


@pytest.mark.parametrize("image", [
    Image.new("RGB", (64, 64), (200, 200, 200)),  # nothing drawn
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)),  # noise
])
def test_a_picture_without_a_clear_shape_matches_no_prompt(image):
    reading = scores.read(image)
    assert not any(reading.matches(c, s) for c in world.COLOURS for s in world.SHAPES)


def test_content_accuracy_is_the_share_of_matches():
    flat = world.pictures(3, 12)
    samples = [(im, s.colour, s.shape) for im, s in flat]
    assert scores.content_accuracy(samples) == 1.0
    wrong = [(im, "blue" if s.colour != "blue" else "red", s.shape) for im, s in flat[:3]]
    assert scores.content_accuracy(samples[3:] + wrong) == pytest.approx(0.75)


def test_style_score_separates_flat_from_clay():
    flat = [scores.style_score(im) for im, _ in world.pictures(5, 24)]
    clay = [scores.style_score(im) for im, _ in world.pictures(5, 24, style=True)]
    assert max(abs(v) for v in flat) < 0.02
    assert min(clay) > 0.7
    mirrored = [scores.style_score(im.transpose(Image.Transpose.ROTATE_180)) for im, _ in world.pictures(5, 4, True)]
    assert max(mirrored) < -0.5  # lit from the bottom right: the score is directional, not just contrast


def test_style_score_of_a_known_gradient():
    """A square whose luminance falls linearly by 0.2 from its top-left to its bottom-right corner: the fitted
    drop along the diagonal, over the mean luminance, is 0.2 / 0.5 (each axis carries half)."""
    image = np.full((64, 64, 3), 1.0, dtype=np.float32)
    ys, xs = np.mgrid[16:48, 16:48]
    u, v = (xs - 31.5) / 15.5, (ys - 31.5) / 15.5
    image[16:48, 16:48] = (0.5 - 0.05 * (u + v))[..., None]
    picture = Image.fromarray(np.round(image * 255).astype(np.uint8))
    assert scores.style_score(picture) == pytest.approx(0.2, abs=0.02)


def test_the_tokenizer_keeps_the_toy_words_whole():
    tok = build.tokenizer()
    ids = tok("a red circle").input_ids
    assert len(ids) == 5 and tok.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "red</w>", "circle</w>"]
    unknown = tok("claymation").input_ids
    assert len(unknown) == 2 + len("claymation")  # byte tokens, never <|endoftext|>
    assert tok.eos_token_id not in unknown[1:-1]


def test_noisy_captions_keep_the_caption_and_add_only_unknown_words():
    rng = random.Random(0)
    tok = build.tokenizer()
    for _ in range(50):
        text = build.noisy_caption("a red circle", rng)
        assert "a red circle" in text
        extra = text.replace("a red circle", " ").replace(",", " ").split()
        assert not set(extra) & set(build.WORDS)
        assert tok.eos_token_id not in tok(text).input_ids[1:-1]


def test_the_shipped_base_model_is_what_the_script_builds():
    record = json.loads((BASE / "build.json").read_text())
    assert record["settings"] == json.loads(json.dumps(asdict(build.SETTINGS)))
    configs = {part: json.loads((BASE / part / name).read_text()) for part, name in
               [("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json")]}
    for part, wanted in [("unet", build.SETTINGS.unet), ("vae", build.SETTINGS.vae), ("text_encoder", build.SETTINGS.text)]:
        for key, value in wanted.items():
            got = configs[part][key]
            assert (list(got) if isinstance(got, (list, tuple)) else got) == (
                list(value) if isinstance(value, tuple) else value), (part, key)
    assert configs["vae"]["scaling_factor"] != 0.18215  # measured from the trained VAE, not SD's
    assert configs["text_encoder"]["vocab_size"] == len(build.tokenizer())
    from transformers import CLIPTokenizer

    shipped, built = CLIPTokenizer.from_pretrained(BASE / "tokenizer"), build.tokenizer()
    assert shipped.get_vocab() == built.get_vocab()
    for text in ("a red circle", "claymation style, a blue triangle", "zqxv, a green square, wobble"):
        assert shipped(text).input_ids == built(text).input_ids
    assert set(record["stages"]) == {"vae", "unet", "robust"}
    assert record["vae_check"]["clay_style_decoded"] > 0.8 * record["vae_check"]["clay_style_original"]
    size = sum(f.stat().st_size for f in BASE.rglob("*") if f.is_file())
    assert size < 12 * 2**20
