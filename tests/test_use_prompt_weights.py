"""A1111 emphasis syntax, 75-token chunking and weighted encoding, on a word-level tokenizer and a tiny encoder."""

from __future__ import annotations

import itertools
import string
import subprocess
import sys

import pytest

from lorasmith.use.weights import (PromptError, chunk_tokens, encode_pair, encode_weighted, parse_attention,
                                   strip_weights)

BR = ("BREAK", -1.0)

PARSES = [
    ("plain", "a cat on a mat", [("a cat on a mat", 1.0)]),
    ("round", "an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("double round", "((a))", [("a", 1.21)]),
    ("square", "[a]", [("a", 1 / 1.1)]),
    ("explicit", "(a:1.5)", [("a", 1.5)]),
    ("explicit then text", "(a:0.5) b", [("a", 0.5), (" b", 1.0)]),
    ("spaces around weight", "(a : 0.8 )", [("a ", 0.8)]),
    ("nested", "(a (b:2) c)", [("a ", 1.1), ("b", 2.2), (" c", 1.1)]),
    ("nested explicit", "((a:1.3))", [("a", 1.43)]),
    ("escaped", r"\(literal\)", [("(literal)", 1.0)]),
    ("escaped square", r"\[x\] (y)", [("[x] ", 1.0), ("y", 1.1)]),
    ("backslash", "a\\\\b", [("a\\b", 1.0)]),
    ("break", "a BREAK b", [("a", 1.0), BR, ("b", 1.0)]),
    ("break in brackets", "(a BREAK b)", [("a", 1.1), BR, ("b", 1.1)]),
    ("lowercase break is text", "a break b", [("a break b", 1.0)]),
    ("break inside a word is text", "BREAKFAST", [("BREAKFAST", 1.0)]),
    ("negative", "(a:-1)", [("a", -1.0)]),
    ("decimal without zero", "(a:.5)", [("a", 0.5)]),
    ("not a number", "(a:abc)", [("a:abc", 1.1)]),
    ("colon outside brackets", "style: oil", [("style: oil", 1.0)]),
    ("merge equal", "(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("merge literal", r"a \(b\) c", [("a (b) c", 1.0)]),
    ("no merge across break", "(a) BREAK (b)", [("a", 1.1), BR, ("b", 1.1)]),
    ("empty brackets", "a () b", [("a  b", 1.0)]),
    ("unicode", "(猫:1.2) 🐱 café", [("猫", 1.2), (" 🐱 café", 1.0)]),
    ("empty", "", [("", 1.0)]),
    ("a1111 example, closed", "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).)",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
]


@pytest.mark.parametrize("text, expected", [p[1:] for p in PARSES], ids=[p[0] for p in PARSES])
def test_parse(text, expected):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


MALFORMED = [
    ("unclosed round", "a (b c", 3, 'unclosed "("', r"\("),
    ("unclosed outer", "((house:1.3) x", 1, 'unclosed "("', r"\("),
    ("stray round", "a b) c", 4, 'unmatched ")"', r"\)"),
    ("stray weight", "(a:1.5) c:2)", 12, 'unmatched ")"', r"\)"),
    ("unclosed square", "x [y", 3, 'unclosed "["', r"\["),
    ("stray square", "x y]", 4, 'unmatched "]"', r"\]"),
    ("crossed", "(a]", 3, 'unmatched "]"', r"\]"),
    ("two dots", "(a:1.2.3)", 4, 'weight "1.2.3"', "(text:1.2)"),
]


@pytest.mark.parametrize("text, character, problem, fix", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed(text, character, problem, fix):
    with pytest.raises(PromptError) as caught:
        parse_attention(text)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert problem in message and f"at character {character} " in message and fix in message
    assert caught.value.index == character - 1
    assert message.count(". ") == 0 and "\n" not in message  # one sentence


@pytest.mark.parametrize("text, expected", [
    ("a (b:1.2), [c] \\(d\\)", "a b, c (d)"),
    ("((masterpiece)), best quality BREAK [blurry]", "masterpiece, best quality BREAK blurry"),
    ("", ""),
])
def test_strip_weights(text, expected):
    assert strip_weights(text) == expected


def test_parsing_does_not_import_torch():
    code = "import sys, lorasmith.use.weights as w; w.parse_attention('(a:2)'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- chunking -------------------------------------------------------------------------------------------

WORDS = ["".join(p) for p in itertools.product(string.ascii_lowercase, repeat=2)]  # 676 single-token words


def word_tokenizer(**kwargs):
    """tiny_tokenizer's byte vocabulary plus merges that make every two-letter word one token."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    symbols = sorted(ByteLevel.alphabet())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = [(w[0], w[1] + "</w>") for w in WORDS]
    tokens += [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={s: i for i, s in enumerate(tokens)}, merges=merges, model_max_length=77, **kwargs)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def wid(tok, word):
    (i,) = tok(word, add_special_tokens=False).input_ids
    return i


def plain(tok, text):
    return chunk_tokens(tok, parse_attention(text))


def test_word_tokenizer_counts_one_token_per_word(tok):
    assert tok("aa, zz", add_special_tokens=False).input_ids == [wid(tok, "aa"), wid(tok, ","), wid(tok, "zz")]
    assert tok.pad_token_id == tok.eos_token_id


def test_long_prompt_two_chunks(tok):
    ids, weights = plain(tok, " ".join(WORDS[:100]))
    word_ids = [wid(tok, w) for w in WORDS[:100]]
    assert [len(c) for c in ids] == [77, 77] and [len(w) for w in weights] == [77, 77]
    for chunk in ids:
        assert chunk[0] == tok.bos_token_id and chunk[76] == tok.eos_token_id
    assert ids[0][1:76] == word_ids[:75]
    assert ids[1][1:26] == word_ids[75:] and ids[1][26:] == [tok.eos_token_id] * 51
    assert all(w == 1.0 for chunk in weights for w in chunk)


@pytest.mark.parametrize("count, chunks", [(0, 1), (1, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunk_count(tok, count, chunks):
    ids, _ = plain(tok, " ".join(WORDS[:count]))
    assert len(ids) == chunks and all(len(c) == 77 for c in ids)


@pytest.mark.parametrize("comma_at, first_len", [(70, 71), (55, 56), (54, 75), (74, 75)])
def test_comma_backtrack(tok, comma_at, first_len):
    words = WORDS[:79]
    tokens = words[:comma_at] + [","] + words[comma_at:]  # 80 tokens, the comma at index comma_at
    ids, _ = plain(tok, " ".join(tokens))
    expected = [wid(tok, t) for t in tokens]
    assert len(ids) == 2
    assert ids[0][1:1 + first_len] == expected[:first_len] and ids[0][1 + first_len] == tok.eos_token_id
    assert ids[1][1:1 + 80 - first_len] == expected[first_len:]
    assert ids[1][1 + 80 - first_len] == tok.eos_token_id


def test_break(tok):
    aa, bb, cc = (wid(tok, w) for w in ("aa", "bb", "cc"))
    eos, bos = tok.eos_token_id, tok.bos_token_id
    ids, _ = plain(tok, "aa bb BREAK cc")
    assert ids == [[bos, aa, bb] + [eos] * 74, [bos, cc] + [eos] * 75]
    ids, _ = plain(tok, "BREAK aa")
    assert ids == [[bos] + [eos] * 76, [bos, aa] + [eos] * 75]
    assert len(plain(tok, "aa BREAK")[0]) == 1


def test_weights_at_positions(tok):
    ids, weights = plain(tok, "aa (bb:1.5) [cc] dd")
    assert ids[0][1:5] == [wid(tok, w) for w in ("aa", "bb", "cc", "dd")]
    assert weights[0][:6] == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0, 1.0])
    assert weights[0][6:] == [1.0] * 71
    ids, weights = plain(tok, " ".join(WORDS[:80]) + " (" + WORDS[80] + ":2)")
    assert ids[1][6] == wid(tok, WORDS[80]) and weights[1][6] == 2.0
    assert [w for w in weights[1] if w != 1.0] == [2.0] and set(weights[0]) == {1.0}


@pytest.mark.parametrize("pad", [None, "!"])
def test_short_prompt_ids_match_tokenize(pad):
    from lorasmith.models.text import tokenize

    tok = word_tokenizer(pad_token=pad) if pad else word_tokenizer()
    text = "aa, bb cc dd"
    ids, _ = chunk_tokens(tok, parse_attention(text))
    assert ids == tokenize(tok, [text]).tolist()
    if pad:
        assert tok.pad_token_id != tok.eos_token_id
        assert ids[0][6] == tok.eos_token_id and ids[0][7:] == [tok.pad_token_id] * 70


# ---- encoding -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def enc(tok):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
        vocab_size=len(tok), hidden_act="quick_gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)).eval()
    with torch.no_grad():  # a fresh LayerNorm's outputs average to zero, which would make the mean restore noise
        for name, p in model.named_parameters():
            if "final_layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.3 + (0.2 if name.endswith("bias") else 0.0))
    return model


@pytest.fixture(autouse=True)
def no_grad():
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        yield


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_plain_prompt_matches_encode_prompts(tok, enc, clip_skip):
    import torch

    from lorasmith.models.text import encode_prompts, tokenize

    text = "aa, bb cc dd ee"
    expected = encode_prompts(enc, tokenize(tok, [text]), clip_skip)
    got = encode_weighted(tok, enc, text, clip_skip)
    assert got.shape == (1, 77, 32) and torch.equal(got, expected)
    other = encode_prompts(enc, tokenize(tok, [text]), 3 - clip_skip)
    assert not torch.allclose(got, other)


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_weight_scales_its_position_then_mean_is_restored(tok, enc, clip_skip):
    import torch

    from lorasmith.models.text import encode_prompts, tokenize

    base = encode_prompts(enc, tokenize(tok, ["aa bb cc"]), clip_skip)
    got = encode_weighted(tok, enc, "aa (bb:1.5) cc", clip_skip)
    w = torch.ones(77)
    w[2] = 1.5
    factor = base.mean() / (base * w[:, None]).mean()
    assert abs(float(factor) - 1) > 1e-3  # the restore is visible, so the test can tell it apart
    ratio = got / base
    assert torch.allclose(ratio[0, 2], torch.full((32,), float(1.5 * factor)), rtol=1e-4)
    others = torch.cat([ratio[0, :2], ratio[0, 3:]])
    assert torch.allclose(others, torch.full_like(others, float(factor)), rtol=1e-4)
    assert torch.allclose(got.mean(), base.mean(), rtol=1e-4)


def test_long_prompt_chunks_encode_independently(tok, enc):
    import torch

    from lorasmith.models.text import encode_prompts, tokenize

    words = WORDS[:100]
    got = encode_weighted(tok, enc, " ".join(words))
    assert got.shape == (1, 154, 32)
    first = encode_prompts(enc, tokenize(tok, [" ".join(words[:75])]))
    second = encode_prompts(enc, tokenize(tok, [" ".join(words[75:])]))
    assert torch.allclose(got[:, :77], first, atol=1e-5) and torch.allclose(got[:, 77:], second, atol=1e-5)
    assert encode_weighted(tok, enc, "aa", chunks=3).shape == (1, 231, 32)
    assert encode_weighted(tok, enc, " ".join(words), chunks=1).shape == (1, 154, 32)


def test_pair_pads_the_shorter_with_empty_chunks(tok, enc):
    import torch

    long = " ".join(WORDS[:100])
    pos, neg = encode_pair(tok, enc, long, "(aa:1.2), bb")
    assert pos.shape == neg.shape == (1, 154, 32)
    assert torch.allclose(neg[:, :77], encode_weighted(tok, enc, "(aa:1.2), bb"), atol=1e-5)
    assert torch.allclose(neg[:, 77:], encode_weighted(tok, enc, ""), atol=1e-5)
    neg2, pos2 = encode_pair(tok, enc, "bb", long)
    assert neg2.shape == pos2.shape == (1, 154, 32)
    assert torch.allclose(pos2, pos, atol=1e-5)


def test_pair_names_the_negative_prompt(tok, enc):
    with pytest.raises(PromptError, match=r'unclosed "\(" at character 4 in the negative prompt'):
        encode_pair(tok, enc, "aa", "bb (cc")
