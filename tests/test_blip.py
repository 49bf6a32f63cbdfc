"""The real BLIP path, on a tiny random-weight model built from a config."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import pattern, training_root
from lorasmith.models.blip import BlipCaptioner, BlipSettings
from lorasmith.common.hub import ModelNotFound, load_model

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def captioner(tiny_blip):
    return BlipCaptioner(BlipSettings(str(tiny_blip), beam_search=True, num_beams=2, max_length=20), "cpu")


def test_beam_search_batch_equals_one_by_one(captioner):
    images = [pattern((64, 48), seed) for seed in range(5)]
    batched = captioner.caption(images)
    assert batched == [captioner.caption([image])[0] for image in images]
    assert len(set(batched)) > 1  # captions depend on the picture
    assert all(isinstance(c, str) and c for c in batched)


def test_max_length_is_clamped_to_the_decoder(tiny_blip):
    blip = BlipCaptioner(BlipSettings(str(tiny_blip), max_length=500), "cpu")
    assert blip.max_length == 96  # the tiny decoder's position table
    assert blip.caption([pattern((32, 32), 1)])[0]


def test_cli_captions_a_training_root(tmp_path, tiny_blip):
    root = training_root(tmp_path / "data", {"10_clay": 3, "2_reg": 1})
    (root / "10_clay" / "img0.txt").write_text("hand written\n", encoding="utf-8")
    done = subprocess.run(
        [str(BIN / "caption-folder"), str(root), "--prefix", "claymation style", "--model", str(tiny_blip),
         "--beam-search", "--batch-size", "2", "--max-length", "12", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "3 captioned, 1 kept, 0 prefixed, 0 failed" in done.stdout
    assert (root / "10_clay" / "img0.txt").read_text(encoding="utf-8") == "hand written\n"
    assert "note: 1 kept caption(s) do not start with 'claymation style' (e.g. img0.txt)" in done.stderr
    for path in [root / "10_clay" / "img1.txt", root / "10_clay" / "img2.txt", root / "2_reg" / "img0.txt"]:
        text = path.read_text(encoding="utf-8")
        assert text.startswith("claymation style, ") and len(text) > len("claymation style, \n")


@pytest.mark.parametrize(
    "model, env, message",
    [
        ("Salesforce/blip-image-captioning-large", {"HF_HUB_OFFLINE": "1"},
         "BLIP model 'Salesforce/blip-image-captioning-large' is not in the local cache and offline mode is set"),
        ("./no/such/folder", {}, "BLIP model './no/such/folder' not found: there is no such file or folder"),
    ],
)
def test_missing_model_is_one_sentence_and_writes_nothing(tmp_path, model, env, message):
    root = training_root(tmp_path / "data", {"10_clay": 2})
    done = subprocess.run(
        [str(BIN / "caption-folder"), str(root), "--model", model, "--quiet"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HOME": str(tmp_path / "hf"), **env},
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not list(root.rglob("*.txt"))


def test_a_broken_model_folder_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    from transformers import BlipForConditionalGeneration

    with pytest.raises(ModelNotFound, match=f"BLIP model folder {tmp_path} could not be loaded"):
        load_model(str(tmp_path), BlipForConditionalGeneration.from_pretrained, "BLIP model")
