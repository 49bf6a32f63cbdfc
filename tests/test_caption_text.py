import pytest

from lorasmith.common.captions import clean_sentence, clean_tag, compose, frequency, has_prefix, replace, tokens


@pytest.mark.parametrize(
    "body, prefix, postfix, separator, expected",
    [
        ("a red ball", "claymation style", "", ", ", "claymation style, a red ball"),
        ("a red ball", "claymation style", "high quality", ", ", "claymation style, a red ball, high quality"),
        ("claymation style, a red ball", "claymation style", "", ", ", "claymation style, a red ball"),  # not doubled
        ("a red ball, Claymation  Style", "claymation style", "", ", ", "claymation style, a red ball"),  # moved first
        ("a ball in claymation style", "claymation style", "", ", ", "claymation style, a ball in claymation style"),
        ("", "claymation style", "", ", ", "claymation style"),
        ("a red ball", "", "", ", ", "a red ball"),
        ("a red ball", "clay, sks", "", ", ", "clay, sks, a red ball"),  # a multi-token prefix
        ("a red ball", "clay", "", " | ", "clay | a red ball"),
        ("a, b,, c ,", "", "", ", ", "a, b, c"),  # tidy spacing and empty tokens
    ],
)
def test_compose(body, prefix, postfix, separator, expected):
    assert compose(body, prefix, postfix, separator) == expected


@pytest.mark.parametrize(
    "caption, prefix, expected",
    [("clay, a ball", "clay", True), ("a ball, clay", "clay", False), ("Clay,a ball", "clay", True), ("x", "", True)],
)
def test_has_prefix(caption, prefix, expected):
    assert has_prefix(caption, prefix) is expected


@pytest.mark.parametrize(
    "tag, spaces, expected",
    [("long_hair", True, "long hair"), ("long_hair", False, "long_hair"), ("^_^", True, "^_^"), ("a,b", True, "a b")],
)
def test_clean_tag(tag, spaces, expected):
    assert clean_tag(tag, spaces) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("arafed man sitting on a bench", "man sitting on a bench"), ("there is a araffe cat", "there is a cat"),
     ("a  giraffe  eating", "a giraffe eating")],
)
def test_clean_sentence(text, expected):
    assert clean_sentence(text) == expected


def test_frequency_counts_each_token_once_per_caption():
    counts = frequency(["clay, red, red ball", "Clay, blue", "clay,red"])
    assert counts == {"clay": 3, "red": 2, "red ball": 1, "blue": 1}


@pytest.mark.parametrize(
    "caption, old, new, regex, token, expected",
    [
        ("clay, red ball, red", "red", "blue", False, False, "clay, blue ball, blue"),
        ("clay, red ball, red", "red", "blue", False, True, "clay, red ball, blue"),
        ("clay, red ball, red", "red", "", False, True, "clay, red ball"),  # token removed with its comma
        ("clay, red ball, red", r"red\b", "green", True, False, "clay, green ball, green"),
        ("clay, 1girl, 2girls", r"\dgirls?", "person", True, True, "clay, person, person"),
    ],
)
def test_replace(caption, old, new, regex, token, expected):
    assert replace(caption, old, new, regex=regex, whole_token=token) == expected


def test_tokens():
    assert tokens(" a ,b,, c ") == ["a", "b", "c"]
