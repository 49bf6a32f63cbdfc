"""Caption text as Kohya reads it: comma-separated tokens, the trigger word first.

Kohya's `keep_tokens` and `shuffle_caption` count comma-separated tokens, so the trigger phrase must be a
token of its own at the front, or shuffling moves it and keep_tokens keeps the wrong words.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

DEFAULT_SEPARATOR = ", "

KAOMOJI = frozenset({"^_^", ">_<", "o_o", "0_0", "(o)_(o)", "+_+", "=_=", "<o>_<o>", "<|>_<|>", "|_|", "x_x", "u_u"})
"""WD14 tags whose underscores are the picture, not word joins (Kohya keeps them too)."""


BLIP_ARTEFACTS = re.compile(r"\b(?:arafed|araffed|arafe|araffe|arrafed|arafly)\b\s*", re.IGNORECASE)
"""Non-words BLIP-large is known to emit at the start of captions ("arafed man sitting on a bench")."""


def clean_sentence(text: str) -> str:
    """A BLIP caption without its known artefact words and doubled spaces."""
    return " ".join(BLIP_ARTEFACTS.sub("", text).split())


def tokens(caption: str) -> list[str]:
    """The comma-separated tokens of a caption, trimmed, empty ones dropped."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def _norm(token: str) -> str:
    return " ".join(token.casefold().split())


def compose(body: str, prefix: str = "", postfix: str = "", separator: str = DEFAULT_SEPARATOR) -> str:
    """`prefix, body, postfix`, without doubling a prefix or postfix the body already has.

    The prefix is moved to the front when the body holds it elsewhere as a token (so it becomes Kohya's
    first token); a body that merely mentions the words inside a sentence keeps them.
    """
    parts, pre, post = tokens(body), tokens(prefix), tokens(postfix)
    wanted = {_norm(t) for t in pre + post}
    middle = [t for t in parts if _norm(t) not in wanted]
    return separator.join([*pre, *middle, *post])


def has_prefix(caption: str, prefix: str) -> bool:
    """Whether the caption already starts with every token of `prefix`, in order."""
    want = [_norm(t) for t in tokens(prefix)]
    have = [_norm(t) for t in tokens(caption)]
    return have[: len(want)] == want


def clean_tag(tag: str, underscores_to_spaces: bool = True) -> str:
    """A WD14 tag as a caption token: `long_hair` → `long hair`, kaomoji kept, commas escaped out."""
    tag = tag.strip().replace(",", " ")
    if underscores_to_spaces and tag not in KAOMOJI:
        tag = tag.replace("_", " ")
    return tag


def frequency(captions: Iterable[str]) -> Counter[str]:
    """How many captions hold each token (case-insensitive); a token counts once per caption."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update({_norm(t) for t in tokens(caption)})
    return counts


def check_pattern(old: str, new: str) -> None:
    """ValueError naming OLD or NEW and where `re` stopped reading it, before any caption is touched."""
    try:
        pattern = re.compile(old)
    except re.error as exc:
        raise ValueError(_pattern_error("OLD", old, "regular expression", exc)) from None
    try:
        pattern.sub(new, "")  # reads NEW's group references (\1, \g<name>) without needing a match
    except re.error as exc:
        raise ValueError(_pattern_error("NEW", new, "replacement", exc)) from None


def _pattern_error(name: str, text: str, what: str, exc: re.error) -> str:
    where = f" at position {exc.pos}" if exc.pos is not None else ""
    return (f"{name} '{text}' is not a valid {what} for --regex: {exc.msg}{where}; put a backslash before the "
            "characters meant literally, such as ( [ * \\, or drop --regex")


def replace(caption: str, old: str, new: str, regex: bool = False, whole_token: bool = False) -> str:
    """Find/replace in one caption; `whole_token` matches complete comma-separated tokens only.

    Removing a token (`new` empty with `whole_token`) drops it and its separator.
    """
    if whole_token:
        result = []
        for token in tokens(caption):
            matched = re.fullmatch(old, token) if regex else _norm(token) == _norm(old)
            if not matched:
                result.append(token)
            elif new.strip():
                result.append(re.sub(old, new, token) if regex else new.strip())
        return DEFAULT_SEPARATOR.join(result)
    return re.sub(old, new, caption) if regex else caption.replace(old, new)
