"""A1111 prompt emphasis and long prompts, so prompts pasted from AUTOMATIC1111 or civitai mean what they meant there.

`(text)` ×1.1, `[text]` ÷1.1, `(text:1.5)` ×1.5, nesting multiplies, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal
characters and `BREAK` starts a new 75-token chunk. Parsing follows A1111's `parse_prompt_attention`, with
these differences, chosen so that a typo is reported instead of silently changing the picture:

- an unclosed or unmatched bracket raises `PromptError` (A1111 closes it at the end of the prompt or keeps it
  as text), naming the character (counted from 1) and the fix;
- `(text:1.2.3)` raises, where A1111 crashes; `(text:abc)` is, as in A1111, the text `text:abc` at ×1.1,
  because only a number right before `)` is a weight;
- `BREAK` inside brackets still breaks (A1111 multiplies its marker and then encodes the word "BREAK");
- empty runs are dropped, and `("BREAK", -1.0)` markers are never multiplied or merged.

A lone backslash before an ordinary character is dropped, and `[a:b:0.5]`, `[a|b]` and `<lora:…>` are plain
text, all as in `parse_prompt_attention`: scheduling and extra networks are another layer's business.
Chunking and weighting follow A1111's `sd_hijack_clip` with the "Original" emphasis.
"""

from __future__ import annotations

import math
import re

BREAK = ("BREAK", -1.0)
MAX_EMPHASIS = 100.0
"""The largest `(text:W)` weight taken (either sign); A1111 users stay within 0–2, and past about 1e30 the
embeddings overflow into a NaN picture."""
COMMA_BACKTRACK = 20
"""A full chunk is cut after its last comma when that comma is this close to the end (A1111's default)."""

_PIECE = re.compile(r"""
    \\[()\[\]\\]                 # an escaped bracket or backslash: the literal character
  | \\                           # a lone backslash: dropped
  | \( | \[
  | :\s*([+-]?[.\d]+)\s*\)       # ":1.5)" closes "(" with that multiplier
  | \) | \]
  | [^\\()\[\]:]+
  | :
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_LITERAL = {"(": "parenthesis", ")": "parenthesis", "[": "bracket", "]": "bracket"}


class PromptError(ValueError):
    """A prompt whose emphasis markup cannot be read; `index` is the 0-based offset of the culprit."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


def _is_break(run) -> bool:
    return run[0] == BREAK[0] and run[1] == BREAK[1]


def _parse(text: str, what: str) -> list[tuple[str, float]]:
    runs: list[list] = []  # [text, weight, is_break]
    opened = {"(": [], "[": []}  # bracket → stack of (character index, first run it covers)

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            if not run[2]:
                run[1] *= factor

    def unmatched(char: str, at: int) -> PromptError:
        opener = "(" if char == ")" else "["
        return PromptError(f'unmatched "{char}" at character {at + 1} in the {what}: remove it, add a "{opener}" '
                           f'before it, or write \\{char} for a literal {_LITERAL[char]}', at)

    for m in _PIECE.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0, False])
        elif piece in opened:
            opened[piece].append((m.start(), len(runs)))
        elif weight is not None:
            if not opened["("]:
                raise unmatched(")", m.end() - 1)
            try:
                factor = float(weight)
            except ValueError:
                raise PromptError(f'weight "{weight}" at character {m.start(1) + 1} in the {what} is not a number: '
                                  f'write a single number, as in (text:1.2)', m.start(1)) from None
            if not math.isfinite(factor) or abs(factor) > MAX_EMPHASIS:
                shown = weight if len(weight) <= 16 else weight[:12] + "…"
                raise PromptError(f'weight "{shown}" at character {m.start(1) + 1} in the {what} is out of range: '
                                  f'emphasis weights are numbers between {-MAX_EMPHASIS:g} and {MAX_EMPHASIS:g}',
                                  m.start(1))
            multiply(opened["("].pop()[1], factor)
        elif piece in (")", "]"):
            opener = "(" if piece == ")" else "["
            if not opened[opener]:
                raise unmatched(piece, m.start())
            multiply(opened[opener].pop()[1], 1.1 if piece == ")" else 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    runs.append([*BREAK, True])
                runs.append([part, 1.0, False])

    left = sorted(at for stack in opened.values() for at, _ in stack)
    if left:
        char = text[left[0]]
        closer = ")" if char == "(" else "]"
        raise PromptError(f'unclosed "{char}" at character {left[0] + 1} in the {what}: close it with "{closer}", '
                          f'or write \\{char} for a literal {_LITERAL[char]}', left[0])

    merged: list[list] = []
    for run in runs:
        if not run[2] and not run[0]:
            continue
        if merged and not run[2] and not merged[-1][2] and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    for text, weight, is_break in merged:
        if not is_break and not abs(weight) <= MAX_EMPHASIS:  # nested brackets multiply
            raise PromptError(f'the emphasis on "{text.strip()[:40]}" in the {what} multiplies to {weight:.3g}, beyond '
                              f'±{MAX_EMPHASIS:g}: remove some brackets', 0)
    return [(t, w) for t, w, _ in merged] or [("", 1.0)]


def parse_attention(text: str, what: str = "prompt") -> list[tuple[str, float]]:
    """(text, multiplier) runs as A1111 reads them, with ("BREAK", -1.0) between chunks; raises `PromptError`
    naming `what` was read (the prompt, the negative prompt)."""
    return _parse(text, what)


def strip_weights(text: str) -> str:
    """The words alone, for labels and captioners; `BREAK` stays, since it is structure, not emphasis.

    Literal brackets come out unescaped: the result is text to show, not a prompt to parse again.
    """
    return "".join(" BREAK " if _is_break(run) else run[0] for run in parse_attention(text)).strip()


def chunk_tokens(tokenizer, parsed) -> tuple[list[list[int]], list[list[float]]]:
    """Token ids and multipliers per chunk of `model_max_length` positions (77 for CLIP), as A1111 packs them.

    Each run is tokenized alone, as in A1111, so brackets split words. After the end token comes the
    tokenizer's pad token, exactly what `tokenize` produces for the same short prompt.
    """
    size = tokenizer.model_max_length - 2
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    texts = [text for text, weight in parsed if not _is_break((text, weight))]
    tokenized = iter(tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
                     if texts else [])

    ids: list[list[int]] = []
    weights: list[list[float]] = []
    chunk: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal chunk, mults, last_comma
        rest = size - len(chunk)
        ids.append([bos, *chunk, eos] + [pad] * rest)
        weights.append([1.0, *mults, 1.0] + [1.0] * rest)
        chunk, mults, last_comma = [], [], -1

    for text, weight in parsed:
        if _is_break((text, weight)):
            close()
            continue
        for token in next(tokenized):
            if token == comma:
                last_comma = len(chunk)
            elif len(chunk) == size and last_comma != -1 and size - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                carried, carried_mults = chunk[cut:], mults[cut:]
                chunk, mults = chunk[:cut], mults[:cut]
                close()
                chunk, mults = carried, carried_mults
            if len(chunk) == size:
                close()
            chunk.append(token)
            mults.append(weight)
    if chunk or not ids:
        close()
    return ids, weights


def _padded(tokenizer, chunked, at_least: int):
    ids, weights = chunked
    if len(ids) < at_least:
        (empty_ids,), (empty_weights,) = chunk_tokens(tokenizer, [("", 1.0)])
        missing = at_least - len(ids)
        ids, weights = ids + [empty_ids] * missing, weights + [empty_weights] * missing
    return ids, weights


def _emphasis(z, weights):
    """[chunks, 77, d] states → [1, 77·chunks, d] with A1111's "Original" emphasis, chunk by chunk: scale each
    position, then restore the chunk's mean so that emphasis shifts attention between words instead of making
    the whole prompt louder."""
    import torch

    before = z.mean(dim=(1, 2), keepdim=True)
    z = z * torch.tensor(weights, dtype=z.dtype, device=z.device)[..., None]
    after = z.mean(dim=(1, 2), keepdim=True)
    z = z * torch.where(after == 0, torch.ones_like(after), before / after)
    return z.reshape(1, -1, z.shape[-1])


def _ids(text_encoder, ids):
    import torch

    return torch.tensor(ids, dtype=torch.long, device=next(text_encoder.parameters()).device)


def _encode(text_encoder, ids, weights, clip_skip: int):
    from lorasmith.models.text import encode_prompts

    return _emphasis(encode_prompts(text_encoder, _ids(text_encoder, ids), clip_skip), weights)


def encode_weighted(tokenizer, text_encoder, prompt: str, clip_skip: int = 1, chunks: int | None = None):
    """[1, 77·k, dim] embeddings of a prompt of any length; `chunks` appends empty chunks up to that many."""
    chunked = chunk_tokens(tokenizer, parse_attention(prompt))
    return _encode(text_encoder, *_padded(tokenizer, chunked, chunks or 0), clip_skip)


def encode_pair(tokenizer, text_encoder, positive: str, negative: str, clip_skip: int = 1):
    """Positive and negative embeddings of equal length, as classifier-free guidance batches them together.

    Both are parsed before anything is encoded, so a typo in either costs no encoder time.
    """
    pos = chunk_tokens(tokenizer, parse_attention(positive))
    neg = chunk_tokens(tokenizer, parse_attention(negative, "negative prompt"))
    k = max(len(pos[0]), len(neg[0]))
    pos, neg = _padded(tokenizer, pos, k), _padded(tokenizer, neg, k)
    return _encode(text_encoder, *pos, clip_skip), _encode(text_encoder, *neg, clip_skip)


def encode_conditioning(family, tokenizers, encoders, positive: str, negative: str, clip_skip: int = 1):
    """(positive, negative) conditioning of equal length for any base family, as `family.render` takes it:
    `context` [1, 77·k, width], and `pooled` [1, projection] where the family has a pooled text input.

    Each text encoder reads the prompt in its own 77-token chunks, with its own pad token, and its chunks are
    weighted and mean-restored on their own; the encoders' states then sit side by side on the feature axis, as
    A1111's SDXL conditioner does per embedder. The pooled embedding is the first chunk's (A1111's
    `zs[0].pooled`, ComfyUI's `first_pooled`, Kohya's `pool2[::n]`). Every encoder and both prompts are padded
    with empty chunks to one count k. Where the family says so, an empty negative prompt is all zeros.
    """
    import torch

    parsed = (parse_attention(positive), parse_attention(negative, "negative prompt"))
    chunked = [[chunk_tokens(tokenizer, runs) for tokenizer in tokenizers] for runs in parsed]  # prompt, encoder
    k = max(len(ids) for per_prompt in chunked for ids, _ in per_prompt)
    conditioned = _conditioning(family, tokenizers, encoders, chunked[0], k, clip_skip)
    if family.zero_empty_negative and not negative.strip():
        return conditioned, {name: torch.zeros_like(value) for name, value in conditioned.items()}
    return conditioned, _conditioning(family, tokenizers, encoders, chunked[1], k, clip_skip)


def _conditioning(family, tokenizers, encoders, chunked, k: int, clip_skip: int) -> dict:
    """One prompt's conditioning from its chunks per encoder, each padded to k chunks (see encode_conditioning)."""
    import torch

    states, pooled = [], None
    for index, (tokenizer, encoder, chunks) in enumerate(zip(tokenizers, encoders, chunked)):
        ids, weights = _padded(tokenizer, chunks, k)
        z, pooled_chunks = family.prompt_states(index, encoder, _ids(encoder, ids), clip_skip)
        states.append(_emphasis(z, weights))
        pooled = pooled if pooled_chunks is None else pooled_chunks[:1]
    return {"context": torch.cat(states, dim=-1), **({"pooled": pooled} if pooled is not None else {})}
