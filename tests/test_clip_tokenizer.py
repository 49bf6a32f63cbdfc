"""The shipped CLIP tokenizer gives CLIP's own token ids, so single-file checkpoints train offline."""

import importlib.util
import json

import pytest

from conftest import REPO
from lorasmith.models.tokenizer import FOLDER, OPENCLIP_PAD, clip_tokenizer


@pytest.mark.parametrize("text, ids", [
    # ids as CLIP's tokenizer gives them (the same lists appear in diffusers' and transformers.js' tests)
    ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
    ("a photo of a dog", [49406, 320, 1125, 539, 320, 1929, 49407]),
    ("An astronaut riding a horse", [49406, 550, 18376, 6765, 320, 4558, 49407]),
    ("hello world", [49406, 3306, 1002, 49407]),
    ("", [49406, 49407]),
])
def test_known_phrases_get_clips_ids(text, ids):
    assert clip_tokenizer()(text).input_ids == ids


def test_vocabulary_layout_and_padding():
    vocab = json.loads((FOLDER / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # the 256 byte symbols, then their end-of-word forms
    merges = (FOLDER / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    sd1, openclip = clip_tokenizer(), clip_tokenizer(OPENCLIP_PAD)
    padded = sd1("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407
    assert openclip("a cat", padding="max_length", max_length=77).input_ids[-1] == 0


def test_the_build_script_makes_the_shipped_vocabulary_from_a_bpe_list(tmp_path):
    """The script's construction on a three-merge list: bytes, end-of-word bytes, merges, specials."""
    import gzip

    spec = importlib.util.spec_from_file_location("build", REPO / "scripts" / "build_clip_tokenizer.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    table = build.bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord("a")] == "a" and table[ord(" ")] == "Ġ"
    shipped = json.loads((FOLDER / "vocab.json").read_text(encoding="utf-8"))
    assert list(shipped)[:256] == list(table.values())
    source = tmp_path / "bpe.txt.gz"
    source.write_bytes(gzip.compress("header\nc a\nca t</w>\nh e\n".encode()))
    vocab, merges = build.build(source)
    assert merges == ["c a", "ca t</w>", "h e"]
    assert [vocab[t] for t in ("ca", "cat</w>", "he", "<|startoftext|>", "<|endoftext|>")] == [512, 513, 514, 515, 516]
